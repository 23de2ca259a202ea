package nbdattach

import (
	"fmt"
	"time"
)

// The kernel's generic netlink family "nbd" (include/uapi/linux/nbd-netlink.h,
// drivers/block/nbd.c). Pure encoding and decoding; see netlink_linux.go for
// the socket.

const (
	nbdGenlFamily  = "nbd"
	nbdGenlVersion = 1

	nbdCmdConnect     = 1
	nbdCmdDisconnect  = 2
	nbdCmdReconfigure = 3
	nbdCmdLinkDead    = 4
	nbdCmdStatus      = 5

	nbdAttrIndex             = 1  // u32
	nbdAttrSizeBytes         = 2  // u64
	nbdAttrBlockSizeBytes    = 3  // u64
	nbdAttrTimeout           = 4  // u64, seconds
	nbdAttrServerFlags       = 5  // u64, the NBD_FLAG_* transmission flags
	nbdAttrClientFlags       = 6  // u64, NBD_CFLAG_*
	nbdAttrSockets           = 7  // nested: nbdSockItem{nbdSockFD}
	nbdAttrDeadConnTimeout   = 8  // u64, seconds
	nbdAttrDeviceList        = 9  // nested: nbdDeviceItem{index, connected}
	nbdAttrBackendIdentifier = 10 // string, shown in /sys/block/nbdN/backend

	nbdDeviceItem      = 1
	nbdDeviceIndex     = 1 // u32
	nbdDeviceConnected = 2 // u8

	nbdSockItem = 1
	nbdSockFD   = 1 // u32
)

// deviceConfig is what NBD_CMD_CONNECT and NBD_CMD_RECONFIGURE carry. Zero
// fields are left out of the message: the kernel keeps its current value
// (RECONFIGURE) or its default (CONNECT).
type deviceConfig struct {
	Index           int // -1: any free device (CONNECT only)
	Size            uint64
	BlockSize       uint64
	Timeout         time.Duration
	DeadConnTimeout time.Duration
	// NoDeadConnTimeout sends a dead-connection timeout of 0 (I/O on a
	// device with no live connection fails at once), which a zero
	// DeadConnTimeout leaves out.
	NoDeadConnTimeout bool
	ServerFlags       TransmissionFlags // CONNECT only
	Identifier        string
	SocketFDs         []int
}

// seconds rounds d up to whole seconds, the unit of the kernel's timeouts.
func seconds(d time.Duration) uint64 {
	return uint64((d + time.Second - 1) / time.Second)
}

// encodeDeviceConfig returns the attributes of a CONNECT or RECONFIGURE.
func encodeDeviceConfig(c deviceConfig, connect bool) []byte {
	var a attrBuilder
	if c.Index >= 0 {
		a.u32(nbdAttrIndex, uint32(c.Index))
	}
	if c.Size > 0 {
		a.u64(nbdAttrSizeBytes, c.Size)
	}
	if c.BlockSize > 0 {
		a.u64(nbdAttrBlockSizeBytes, c.BlockSize)
	}
	if c.Timeout > 0 {
		a.u64(nbdAttrTimeout, seconds(c.Timeout))
	}
	if c.DeadConnTimeout > 0 {
		a.u64(nbdAttrDeadConnTimeout, seconds(c.DeadConnTimeout))
	} else if c.NoDeadConnTimeout {
		a.u64(nbdAttrDeadConnTimeout, 0)
	}
	if connect {
		a.u64(nbdAttrServerFlags, uint64(c.ServerFlags))
	}
	if c.Identifier != "" {
		a.str(nbdAttrBackendIdentifier, c.Identifier)
	}
	if len(c.SocketFDs) > 0 {
		a.nested(nbdAttrSockets, func(s *attrBuilder) {
			for _, fd := range c.SocketFDs {
				s.nested(nbdSockItem, func(i *attrBuilder) { i.u32(nbdSockFD, uint32(fd)) })
			}
		})
	}
	return a.b
}

// encodeIndex returns the attributes of a DISCONNECT or STATUS of one
// device; a negative index (STATUS of every device) has none.
func encodeIndex(index int) []byte {
	var a attrBuilder
	if index >= 0 {
		a.u32(nbdAttrIndex, uint32(index))
	}
	return a.b
}

// parseConnectReply returns the device index the kernel picked.
func parseConnectReply(attrs []byte) (int, error) {
	as, err := parseAttrs(attrs)
	if err != nil {
		return 0, err
	}
	for _, a := range as {
		if a.Type == nbdAttrIndex {
			v, err := a.u32()
			return int(v), err
		}
	}
	return 0, fmt.Errorf("connect reply without an index: %w", ErrNetlink)
}

// parseStatusReply decodes NBD_ATTR_DEVICE_LIST.
func parseStatusReply(attrs []byte) ([]DeviceStatus, error) {
	as, err := parseAttrs(attrs)
	if err != nil {
		return nil, err
	}
	var devs []DeviceStatus
	for _, a := range as {
		if a.Type != nbdAttrDeviceList {
			continue
		}
		items, err := parseAttrs(a.Data)
		if err != nil {
			return nil, err
		}
		for _, it := range items {
			if it.Type != nbdDeviceItem {
				continue
			}
			d, err := parseDeviceItem(it.Data)
			if err != nil {
				return nil, err
			}
			devs = append(devs, d)
		}
	}
	return devs, nil
}

func parseDeviceItem(b []byte) (DeviceStatus, error) {
	as, err := parseAttrs(b)
	if err != nil {
		return DeviceStatus{}, err
	}
	d, haveIndex := DeviceStatus{}, false
	for _, a := range as {
		switch a.Type {
		case nbdDeviceIndex:
			v, err := a.u32()
			if err != nil {
				return DeviceStatus{}, err
			}
			d.Index, haveIndex = int(v), true
		case nbdDeviceConnected:
			v, err := a.u8()
			if err != nil {
				return DeviceStatus{}, err
			}
			d.Connected = v != 0
		}
	}
	if !haveIndex {
		return DeviceStatus{}, fmt.Errorf("device item without an index: %w", ErrNetlink)
	}
	return d, nil
}
