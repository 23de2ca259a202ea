// Command killclient is the NBD client of hack/kill-rounds.sh.
//
//	killclient write -socket S -journal J -round N -cluster C [-ready FILE] [-depth D] [-seed X]
//	killclient verify -journal J -raw IMAGE.raw [-base BASELINE.raw]
//
// write connects to an NBD server on a unix socket and issues random
// writes (unaligned, multi-cluster, some WRITE_ZEROES, some FUA) with up
// to -depth in flight, and FLUSHes, until the connection dies (the server
// is SIGKILLed); the journal records every write before it is sent and,
// fsynced, every write that became durable (acknowledged before a FLUSH
// that completed, or acknowledged with FUA). It exits 0 when the
// connection died and non-zero on an NBD error reply or a timeout.
//
// verify reads the image's raw content (after the kill) and checks, byte
// by byte, that every durable write is there unless a later write covers
// it, and that nothing outside the round's writes changed from the
// baseline. It exits 1 if not.
package main

import (
	"flag"
	"fmt"
	"os"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	var err error
	switch os.Args[1] {
	case "write":
		socket := fs.String("socket", "", "NBD unix socket")
		journal := fs.String("journal", "", "journal file to write")
		ready := fs.String("ready", "", "create this file once connected")
		round := fs.Int("round", 0, "round number (part of every data pattern)")
		cluster := fs.Int64("cluster", 65536, "the image's cluster size, for write sizes")
		depth := fs.Int("depth", 8, "requests in flight at most")
		seed := fs.Uint64("seed", uint64(time.Now().UnixNano()), "random seed")
		timeout := fs.Duration("timeout", 30*time.Second, "fail if still connected after this")
		ackIsDurable := fs.Bool("mutation-ack-is-durable", false, "journal writes durable when acknowledged, without a FLUSH (to show verify can fail)")
		fs.Parse(os.Args[2:])
		err = runWrite(*socket, *journal, *ready, *round, *cluster, *depth, *seed, *timeout, *ackIsDurable)
	case "verify":
		journal := fs.String("journal", "", "journal written by write")
		raw := fs.String("raw", "", "the image's raw content after the kill")
		base := fs.String("base", "", "the raw content before the round (default: zeros)")
		fs.Parse(os.Args[2:])
		err = runVerify(*journal, *raw, *base)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "killclient %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: killclient write|verify [flags] (see the package comment)")
	os.Exit(2)
}
