package driver

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/klog/v2"
)

// DefaultDriverName is the one name the driver is known by: GetPluginInfo
// answers it, and the CSIDriver object and StorageClass provisioner must use
// it too.
const DefaultDriverName = "qcow2.csi-qcow2.io"

// DefaultTopologyKey is the topology segment key NodeGetInfo reports and
// CreateVolume answers in accessible_topology.
const DefaultTopologyKey = "topology.qcow2.csi-qcow2.io/node"

// Mode selects which CSI services the process serves.
type Mode string

const (
	// ModeAll serves identity, controller and node: the deployment the
	// driver is designed for, one process per node holding that node's
	// images (the controller must run where the images are).
	ModeAll Mode = "all"
	// ModeController serves identity and controller only.
	ModeController Mode = "controller"
	// ModeNode serves identity and node only.
	ModeNode Mode = "node"
)

// Options configure the driver. Run validates them.
type Options struct {
	// Endpoint is the gRPC listen address, unix:///path/csi.sock.
	Endpoint string
	// NodeID is this node's name; it is the topology segment value too.
	NodeID string
	// DataDir holds volumes/ (images and metadata), snapshots/ and staged/.
	DataDir string
	// DriverName is answered by GetPluginInfo.
	DriverName string
	// TopologyKey is the topology segment key.
	TopologyKey string
	// Mode selects the services served.
	Mode Mode
	// MaxVolumes caps NodeGetInfo's max_volumes_per_node; 0 means the
	// number of free /dev/nbdX devices.
	MaxVolumes int64
	// CapacityReserve is kept free on the data dir's filesystem: GetCapacity
	// answers free bytes minus this.
	CapacityReserve int64
	// NBDConnections is the number of NBD sockets per attached device; 0
	// means nbdattach's default (one per CPU, at most 8). The default is
	// 1: with more, the kernel shuts a live connection down when a request
	// on it outlives its 30 s timer and resends the request on another,
	// while this process may still carry the first copy out (a slow write
	// can land after newer writes to the same blocks), and nothing
	// replaces the lost connection, so I/O fails once the last one goes
	// (nbdattach.AttachOptions.Timeout). One connection with no command
	// timeout is never cut while this process lives.
	NBDConnections int
	// NBDIOTimeout is the request timer of one-connection devices
	// (/sys/block/nbdX/queue/io_timeout, set at stage or recovery, put
	// back at unstage): after a restart, the requests the killed driver
	// held are resent this long after the new one reconnects, instead of
	// the kernel's 30 s. A slow request on a live connection only makes
	// the kernel log "Possible stuck request" each period. 0 leaves the
	// kernel's timer; not applied with NBDConnections other than 1.
	NBDIOTimeout time.Duration
	// DeadConnTimeout is how long I/O on an attached device waits for a
	// restarted driver to reconnect before failing.
	DeadConnTimeout time.Duration
	// MetricsAddress, if set, is where /metrics is served (host:port).
	MetricsAddress string
	// HealthzAddress, if set, is where /healthz is served (host:port):
	// Probe, called in-process, and the sockets kubelet needs
	// (healthz.go). It stands in for the livenessprobe sidecar.
	HealthzAddress string
	// PluginRegistrationDir, if set, is kubelet's plugins_registry
	// directory as this process sees it: the driver serves kubelet's
	// plugin registration API there, on <DriverName>-reg.sock
	// (registration.go), in place of the node-driver-registrar sidecar.
	PluginRegistrationDir string
	// KubeletRegistrationPath is the CSI socket's path as kubelet on the
	// host sees it, the endpoint kubelet is told to call. Required with
	// PluginRegistrationDir.
	KubeletRegistrationPath string
	// SnapshotMetadataAddress, if set, enables the CSI SnapshotMetadata
	// service (changed-block tracking, snapshotmetadata.go): on the CSI
	// socket, as the spec wants every service there, and over mutual TLS
	// on this host:port for clients off the node (metadatatls.go). There
	// is no plain-TCP form.
	SnapshotMetadataAddress string
	// SnapshotMetadataTLSCert and SnapshotMetadataTLSKey are the server's
	// PEM certificate (chain) and key; SnapshotMetadataClientCA the PEM CA
	// bundle a client's certificate must verify against. All three are
	// required with SnapshotMetadataAddress and are reread when they change.
	SnapshotMetadataTLSCert  string
	SnapshotMetadataTLSKey   string
	SnapshotMetadataClientCA string
	// SnapshotMetadataOptional leaves the service off, logged, instead of
	// failing start when a TLS file does not exist: for manifests that
	// mount an optional Secret, so they run before the Secret is made.
	SnapshotMetadataOptional bool
	// PeerAddress, if set, serves the node-to-node peer service (peer.go)
	// over mutual TLS on this host:port: other nodes' drivers restore and
	// clone this node's snapshots and volumes through it. There is no
	// plain-TCP form.
	PeerAddress string
	// PeerTLSCert and PeerTLSKey are this node's PEM certificate (chain)
	// and key, presented both as the peer server and as a client of other
	// nodes; PeerCA is the PEM CA bundle both sides must chain to. All
	// three are required with PeerAddress and are reread when they change.
	PeerTLSCert string
	PeerTLSKey  string
	PeerCA      string
	// PeerServerName is the name a peer's server certificate must carry
	// (a DNS SAN), whatever address it was dialled at.
	PeerServerName string
	// Peers are where the other nodes' peer services are: comma-separated
	// host:port, each host resolved to all its addresses (a headless
	// Service over the DaemonSet resolves to every node's pod).
	Peers string
	// PeerOptional leaves the peer service off, logged, instead of failing
	// start when a TLS file does not exist (an optional Secret).
	PeerOptional bool
	// PeerGrantTTL is how long a grant to read a snapshot lasts.
	PeerGrantTTL time.Duration
	// OrphanCheck turns the orphan checker (orphans.go) on or off: auto
	// runs it when the process is in a cluster (KUBERNETES_SERVICE_HOST
	// is set), on requires it, off never runs it. It runs in modes with
	// the controller service, with in-cluster credentials only.
	OrphanCheck string
	// OrphanCheckInterval is the time between orphan checks.
	OrphanCheckInterval time.Duration
	// OrphanGrace: a volume or snapshot created less than this long ago
	// is never an orphan (its PV or VolumeSnapshotContent may not exist
	// yet).
	OrphanGrace time.Duration
	// DeleteOrphansAfter, if set, deletes (through DeleteVolume and
	// DeleteSnapshot) what every check for this long found orphaned.
	// 0, the default, never deletes.
	DeleteOrphansAfter time.Duration
}

// minOrphanGrace is the shortest --orphan-grace deletion is allowed with.
const minOrphanGrace = time.Minute

// Orphan check settings.
const (
	OrphanCheckAuto = "auto"
	OrphanCheckOn   = "on"
	OrphanCheckOff  = "off"
)

// DefaultOptions are the flag defaults.
func DefaultOptions() Options {
	return Options{
		Endpoint:        "unix:///csi/csi.sock",
		DriverName:      DefaultDriverName,
		TopologyKey:     DefaultTopologyKey,
		Mode:            ModeAll,
		NBDConnections:  1,
		NBDIOTimeout:    5 * time.Second,
		DeadConnTimeout: 2 * time.Minute,

		OrphanCheck:         OrphanCheckAuto,
		OrphanCheckInterval: 10 * time.Minute,
		OrphanGrace:         time.Hour,

		PeerServerName: "csi-qcow2-peer",
		PeerGrantTTL:   10 * time.Minute,
	}
}

// AddFlags registers the driver's flags on fs, defaulting to o's values.
func (o *Options) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Endpoint, "endpoint", o.Endpoint, "CSI endpoint, unix:///path/csi.sock")
	fs.StringVar(&o.NodeID, "node-id", o.NodeID, "this node's name (also its topology segment value)")
	fs.StringVar(&o.DataDir, "data-dir", o.DataDir, "directory holding the volume images and metadata")
	fs.StringVar(&o.DriverName, "driver-name", o.DriverName, "CSI driver name (CSIDriver and StorageClass provisioner)")
	fs.StringVar(&o.TopologyKey, "topology-key", o.TopologyKey, "topology segment key reported by NodeGetInfo")
	fs.StringVar((*string)(&o.Mode), "mode", string(o.Mode), "services to serve: all, controller or node")
	fs.Int64Var(&o.MaxVolumes, "max-volumes", o.MaxVolumes, "max volumes per node (0: the number of free /dev/nbdX)")
	fs.Int64Var(&o.CapacityReserve, "capacity-reserve", o.CapacityReserve, "bytes of the data dir's filesystem GetCapacity keeps back")
	fs.IntVar(&o.NBDConnections, "nbd-connections", o.NBDConnections,
		"NBD sockets per device (0: one per CPU, at most 8). With more than one, a request slower than the kernel's 30 s timer gets its connection cut and is resent on another while the driver may still write it (a late write can overwrite newer data), and cut connections are not replaced")
	fs.DurationVar(&o.NBDIOTimeout, "nbd-io-timeout", o.NBDIOTimeout,
		"request timer of one-connection devices (queue/io_timeout): requests a killed driver held are resent this long after the restarted one reconnects; a slower request only logs a kernel warning. 0: the kernel's 30 s")
	fs.DurationVar(&o.DeadConnTimeout, "nbd-dead-conn-timeout", o.DeadConnTimeout, "how long device I/O waits for a restarted driver")
	fs.StringVar(&o.MetricsAddress, "metrics-address", o.MetricsAddress, "serve Prometheus metrics at http://ADDRESS/metrics, e.g. :9808 (default off)")
	fs.StringVar(&o.HealthzAddress, "healthz-address", o.HealthzAddress,
		"serve http://ADDRESS/healthz, e.g. :9809: 200 when Probe says ready and the CSI socket (and registration socket, if on) exist, else 500 (default off)")
	fs.StringVar(&o.PluginRegistrationDir, "plugin-registration-dir", o.PluginRegistrationDir,
		"kubelet's plugins_registry directory as mounted here, e.g. /registration: serve kubelet plugin registration on DIR/<driver-name>-reg.sock (default off)")
	fs.StringVar(&o.KubeletRegistrationPath, "kubelet-registration-path", o.KubeletRegistrationPath,
		"the CSI socket's absolute path as kubelet on the host sees it, e.g. /var/lib/kubelet/plugins/"+DefaultDriverName+"/csi.sock (required with --plugin-registration-dir)")
	fs.StringVar(&o.SnapshotMetadataAddress, "snapshot-metadata-address", o.SnapshotMetadataAddress,
		"serve the CSI SnapshotMetadata service (changed-block tracking) on the CSI socket and over mutual TLS at ADDRESS, e.g. :50051 (default off; needs the three --snapshot-metadata-tls/client-ca files)")
	fs.StringVar(&o.SnapshotMetadataTLSCert, "snapshot-metadata-tls-cert", o.SnapshotMetadataTLSCert, "PEM certificate (chain) of the snapshot metadata TLS server")
	fs.StringVar(&o.SnapshotMetadataTLSKey, "snapshot-metadata-tls-key", o.SnapshotMetadataTLSKey, "PEM private key of the snapshot metadata TLS server")
	fs.StringVar(&o.SnapshotMetadataClientCA, "snapshot-metadata-client-ca", o.SnapshotMetadataClientCA,
		"PEM CA bundle that snapshot metadata clients' certificates must chain to (clients without one are refused)")
	fs.BoolVar(&o.SnapshotMetadataOptional, "snapshot-metadata-optional", o.SnapshotMetadataOptional,
		"if a snapshot metadata TLS file does not exist, leave the service off (logged) instead of failing: for an optional Secret")
	fs.StringVar(&o.PeerAddress, "peer-address", o.PeerAddress,
		"serve the node-to-node peer service (cross-node restore and clone) over mutual TLS at ADDRESS, e.g. :7443 (default off; needs --peer-tls-cert, --peer-tls-key and --peer-ca)")
	fs.StringVar(&o.PeerTLSCert, "peer-tls-cert", o.PeerTLSCert, "PEM certificate (chain) this node presents to peers, as server and as client")
	fs.StringVar(&o.PeerTLSKey, "peer-tls-key", o.PeerTLSKey, "PEM private key of --peer-tls-cert")
	fs.StringVar(&o.PeerCA, "peer-ca", o.PeerCA, "PEM CA bundle every peer's certificate must chain to")
	fs.StringVar(&o.PeerServerName, "peer-server-name", o.PeerServerName, "DNS name a peer's server certificate must carry")
	fs.StringVar(&o.Peers, "peers", o.Peers,
		"comma-separated host:port of the other nodes' peer services; each host resolves to all its addresses, e.g. a headless Service over the DaemonSet")
	fs.BoolVar(&o.PeerOptional, "peer-optional", o.PeerOptional,
		"if a peer TLS file does not exist, leave the peer service off (logged) instead of failing: for an optional Secret")
	fs.DurationVar(&o.PeerGrantTTL, "peer-grant-ttl", o.PeerGrantTTL, "how long a peer's grant to read a snapshot lasts")
	fs.StringVar(&o.OrphanCheck, "orphan-check", o.OrphanCheck,
		"report volumes and snapshots of the data dir that no PersistentVolume or VolumeSnapshotContent names (metric "+metricOrphans+" and a log line): auto (when in a cluster), on or off; needs the controller service and in-cluster credentials")
	fs.DurationVar(&o.OrphanCheckInterval, "orphan-check-interval", o.OrphanCheckInterval, "time between orphan checks (the first is at start)")
	fs.DurationVar(&o.OrphanGrace, "orphan-grace", o.OrphanGrace,
		"a volume or snapshot created less than this long ago is never an orphan (a CreateVolume in flight has no PV yet)")
	fs.DurationVar(&o.DeleteOrphansAfter, "delete-orphans-after", o.DeleteOrphansAfter,
		"delete, through DeleteVolume and DeleteSnapshot, what every orphan check for this long found orphaned; staged volumes never (default 0: never delete, only report)")
	// klog's verbosity, process-wide: without it the V(n) lines (refused
	// peer grants, the details of many RPCs) could never be turned on.
	kfs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(kfs)
	v := kfs.Lookup("v")
	v.Usage = "log verbosity: 2 adds refused peer grants and other detail; 4 debugging detail"
	fs.AddGoFlag(v)
}

// Validate checks the options and cleans DataDir.
func (o *Options) Validate() error {
	var errs []error
	if _, err := socketPath(o.Endpoint); err != nil {
		errs = append(errs, err)
	}
	if o.NodeID == "" {
		errs = append(errs, errors.New("--node-id is required"))
	}
	if o.DataDir == "" {
		errs = append(errs, errors.New("--data-dir is required"))
	} else if !filepath.IsAbs(o.DataDir) {
		abs, err := filepath.Abs(o.DataDir)
		if err != nil {
			errs = append(errs, fmt.Errorf("--data-dir: %w", err))
		}
		o.DataDir = abs
	}
	if o.DriverName == "" || len(o.DriverName) > 63 || strings.ContainsAny(o.DriverName, " /") {
		errs = append(errs, fmt.Errorf("--driver-name %q: want a DNS-style name of at most 63 characters", o.DriverName))
	}
	if o.TopologyKey == "" {
		errs = append(errs, errors.New("--topology-key is required"))
	}
	switch o.Mode {
	case ModeAll, ModeController, ModeNode:
	default:
		errs = append(errs, fmt.Errorf("--mode %q: want all, controller or node", o.Mode))
	}
	if o.MaxVolumes < 0 || o.CapacityReserve < 0 || o.NBDConnections < 0 || o.DeadConnTimeout < 0 || o.NBDIOTimeout < 0 {
		errs = append(errs, errors.New("--max-volumes, --capacity-reserve, --nbd-connections, --nbd-dead-conn-timeout and --nbd-io-timeout must not be negative"))
	}
	if t := o.NBDIOTimeout; t > 0 && (t < time.Second || t%time.Millisecond != 0) {
		errs = append(errs, fmt.Errorf("--nbd-io-timeout %v: want 0, or whole milliseconds of at least 1s", t))
	}
	errs = append(errs, o.validateRegistration()...)
	errs = append(errs, o.validateSnapshotMetadata()...)
	errs = append(errs, o.validateOrphans()...)
	errs = append(errs, o.validatePeer()...)
	return errors.Join(errs...)
}

// validateSnapshotMetadata checks that the snapshot metadata flags come
// together; whether the files exist and parse is judged at New.
func (o *Options) validateSnapshotMetadata() []error {
	files := []string{o.SnapshotMetadataTLSCert, o.SnapshotMetadataTLSKey, o.SnapshotMetadataClientCA}
	if o.SnapshotMetadataAddress == "" {
		if slices.ContainsFunc(files, func(f string) bool { return f != "" }) || o.SnapshotMetadataOptional {
			return []error{errors.New("--snapshot-metadata-tls-cert, -tls-key, -client-ca or -optional is set but --snapshot-metadata-address is not: nothing would serve them")}
		}
		return nil
	}
	return validateTLSListener("--snapshot-metadata-address", o.SnapshotMetadataAddress, ":50051", files,
		"--snapshot-metadata-tls-cert, --snapshot-metadata-tls-key and --snapshot-metadata-client-ca")
}

// validateTLSListener checks a mutual-TLS listener's address and that
// all of its files are named.
func validateTLSListener(flag, addr, example string, files []string, fileFlags string) []error {
	var errs []error
	if _, _, err := net.SplitHostPort(addr); err != nil {
		errs = append(errs, fmt.Errorf("%s %q: want HOST:PORT, e.g. %s", flag, addr, example))
	}
	if slices.Contains(files, "") {
		errs = append(errs, fmt.Errorf("%s needs %s (mutual TLS; there is no plain TCP)", flag, fileFlags))
	}
	return errs
}

// validatePeer checks that the peer flags come together; whether the
// files exist and parse is judged at New.
func (o *Options) validatePeer() []error {
	files := []string{o.PeerTLSCert, o.PeerTLSKey, o.PeerCA}
	if o.PeerAddress == "" {
		if slices.ContainsFunc(files, func(f string) bool { return f != "" }) || o.PeerOptional || o.Peers != "" {
			return []error{errors.New("--peer-tls-cert, -tls-key, --peer-ca, --peers or --peer-optional is set but --peer-address is not")}
		}
		return nil
	}
	errs := validateTLSListener("--peer-address", o.PeerAddress, ":7443", files, "--peer-tls-cert, --peer-tls-key and --peer-ca")
	for _, p := range peerList(o.Peers) {
		if _, _, err := net.SplitHostPort(p); err != nil {
			errs = append(errs, fmt.Errorf("--peers: %q: want HOST:PORT", p))
		}
	}
	if o.PeerServerName == "" || o.PeerGrantTTL <= 0 {
		errs = append(errs, errors.New("--peer-server-name must be set and --peer-grant-ttl positive"))
	}
	return errs
}

// peerList splits --peers.
func peerList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func (o *Options) validateOrphans() []error {
	var errs []error
	switch o.OrphanCheck {
	case OrphanCheckAuto, OrphanCheckOn:
		if o.OrphanCheck == OrphanCheckOn && !o.Mode.controller() {
			errs = append(errs, fmt.Errorf("--orphan-check=on with --mode %s: orphans are deleted through the controller service (want --mode all or controller)", o.Mode))
		}
		if o.OrphanCheckInterval <= 0 {
			errs = append(errs, fmt.Errorf("--orphan-check-interval %v: want a positive duration", o.OrphanCheckInterval))
		}
	case OrphanCheckOff:
		if o.DeleteOrphansAfter != 0 {
			errs = append(errs, errors.New("--delete-orphans-after with --orphan-check=off: nothing would find orphans"))
		}
	default:
		errs = append(errs, fmt.Errorf("--orphan-check %q: want auto, on or off", o.OrphanCheck))
	}
	if o.OrphanGrace < 0 || o.DeleteOrphansAfter < 0 {
		errs = append(errs, errors.New("--orphan-grace and --delete-orphans-after must not be negative"))
	}
	// The grace period also covers what is created between a check's
	// cluster listing and its data dir listing.
	if o.DeleteOrphansAfter > 0 && o.OrphanGrace < minOrphanGrace {
		errs = append(errs, fmt.Errorf("--orphan-grace %v with --delete-orphans-after: want at least %v (a volume whose CreateVolume just returned has no PV yet)", o.OrphanGrace, minOrphanGrace))
	}
	return errs
}

func (o *Options) snapshotMetadata() bool { return o.SnapshotMetadataAddress != "" }

// maxSocketPath is the longest path a unix socket can be bound or dialled
// at: sun_path is 108 bytes on Linux, with a terminating NUL.
const maxSocketPath = 107

// validateRegistration checks the plugin registration flags and makes the
// directory absolute.
func (o *Options) validateRegistration() []error {
	if o.PluginRegistrationDir == "" {
		if o.KubeletRegistrationPath != "" {
			return []error{errors.New("--kubelet-registration-path is set but --plugin-registration-dir is not: nothing would register it")}
		}
		return nil
	}
	var errs []error
	if abs, err := filepath.Abs(o.PluginRegistrationDir); err != nil {
		errs = append(errs, fmt.Errorf("--plugin-registration-dir: %w", err))
	} else {
		o.PluginRegistrationDir = abs
	}
	if p := o.registrationSocket(); len(p) > maxSocketPath {
		errs = append(errs, fmt.Errorf("--plugin-registration-dir: socket path %s is longer than %d bytes", p, maxSocketPath))
	}
	switch p := o.KubeletRegistrationPath; {
	case p == "":
		errs = append(errs, errors.New("--kubelet-registration-path is required with --plugin-registration-dir"))
	case !filepath.IsAbs(p):
		errs = append(errs, fmt.Errorf("--kubelet-registration-path %q: want the absolute path kubelet dials, e.g. /var/lib/kubelet/plugins/%s/csi.sock", p, o.DriverName))
	case len(p) > maxSocketPath:
		errs = append(errs, fmt.Errorf("--kubelet-registration-path %q is longer than %d bytes", p, maxSocketPath))
	}
	if o.Mode == ModeController {
		errs = append(errs, errors.New("--plugin-registration-dir with --mode controller: kubelet registers node plugins (want --mode all or node)"))
	}
	return errs
}

// registrationSocket is where kubelet's plugin watcher finds the driver:
// the name node-driver-registrar uses, so either can take the other's place.
func (o *Options) registrationSocket() string {
	return filepath.Join(o.PluginRegistrationDir, o.DriverName+"-reg.sock")
}

// socketPath returns the filesystem path of a unix:// endpoint.
func socketPath(endpoint string) (string, error) {
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme != "unix" {
		return "", fmt.Errorf("--endpoint %q: want unix:///path/to/csi.sock", endpoint)
	}
	p := u.Path
	if u.Host != "" { // unix://relative/path
		p = u.Host + p
	}
	if p == "" {
		return "", fmt.Errorf("--endpoint %q: no socket path", endpoint)
	}
	return p, nil
}

func (m Mode) controller() bool { return m == ModeAll || m == ModeController }
func (m Mode) node() bool       { return m == ModeAll || m == ModeNode }
