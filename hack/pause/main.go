// Command pause is the sandbox ("pause") container of a pod, in the image
// hack/build-images.sh names registry.k8s.io/pause:3.10: it holds the
// pod's namespaces open and does nothing else. Like the upstream pause.c
// it blocks until SIGINT or SIGTERM, then exits 0, and as PID 1 of a
// shared PID namespace it reaps the children that are handed to it.
//
// Build it static: CGO_ENABLED=0 go build -ldflags "-s -w" ./hack/pause
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

const version = "3.10-csi-qcow2"

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pause.go", version)
		return
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	if os.Getpid() != 1 { // after Notify: a test reads this as "ready"
		fmt.Fprintln(os.Stderr, "Warning: pause should be the first process")
	}
	for sig := range sigs {
		if sig == syscall.SIGCHLD {
			reap()
			continue
		}
		fmt.Fprintf(os.Stderr, "Shutting down, got signal: %v\n", sig)
		os.Exit(0)
	}
}

// reap waits for every child that has exited; one SIGCHLD may stand for
// several.
func reap() {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
	}
}
