// snapshotter-suite runs containerd's snapshotter test suite
// (github.com/containerd/containerd/snapshots/testsuite, as packaged by
// Debian) against stargaze-snapshotter processes. It talks to them the way
// containerd talks to a proxy snapshot plugin: the snapshots proxy client
// over a gRPC connection to the plugin's unix socket.
//
// The suite asks for a fresh snapshotter with its own root for every case;
// each gets its own stargaze-snapshotter process, socket and log file, and
// the process is stopped when the case ends. The suite mounts what the
// snapshotter returns itself, so this must run as root.
//
// Usage:
//
//	snapshotter-suite -snapshotter BIN -config FILE -logs DIR [-test.v] [-test.run RE]
//
// The output is `go test`'s. It is built by stargaze's test kit in GOPATH
// mode against /usr/share/gocode; it is test tooling, not part of the product.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

var (
	snapshotterBin = flag.String("snapshotter", "", "the stargaze-snapshotter binary")
	configFile     = flag.String("config", "", "stargaze config file passed to every snapshotter")
	logDir         = flag.String("logs", "", "directory for the snapshotters' logs")
)

// The name containerd would give the plugin in its [proxy_plugins] table;
// the proxy client sends it in every request.
const pluginName = "stargaze"

// How long a snapshotter may take to listen, and to exit after SIGTERM.
const (
	startTimeout = 20 * time.Second
	stopTimeout  = 10 * time.Second
)

var started int64

func main() {
	testing.Main(regexp.MatchString, []testing.InternalTest{
		{Name: "TestSnapshotterSuite", F: testSnapshotterSuite},
	}, nil, nil)
}

func testSnapshotterSuite(t *testing.T) {
	if *snapshotterBin == "" || *configFile == "" || *logDir == "" {
		t.Fatal("usage: snapshotter-suite -snapshotter BIN -config FILE -logs DIR")
	}
	testsuite.SnapshotterSuite(t, "stargaze", startSnapshotter)
}

// snapshotter is one running stargaze-snapshotter and the client to it.
type snapshotter struct {
	cmd    *exec.Cmd
	exited chan struct{}
	conn   *grpc.ClientConn
	log    string
}

// startSnapshotter is the suite's factory: a new process on `root`, with its
// socket beside root in the case's private temporary directory.
func startSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	socket := filepath.Join(filepath.Dir(root), "snapshotter.sock")
	n := atomic.AddInt64(&started, 1)
	logPath := filepath.Join(*logDir, fmt.Sprintf("snapshotter-%03d.log", n))
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	defer logFile.Close()

	cmd := exec.Command(*snapshotterBin,
		"--config", *configFile, "--address", socket, "--root", root)
	cmd.Stdin = nil
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// The snapshotter must not outlive this program if it is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("cannot start %s: %w", *snapshotterBin, err)
	}
	s := &snapshotter{cmd: cmd, exited: make(chan struct{}), log: logPath}
	go func() {
		_ = cmd.Wait()
		close(s.exited)
	}()
	log.G(ctx).Infof("stargaze-snapshotter pid %d on root %s, log %s", cmd.Process.Pid, root, logPath)

	if err := s.waitListening(socket); err != nil {
		_ = s.stop()
		return nil, nil, err
	}
	conn, err := grpc.Dial(dialer.DialAddress(socket),
		grpc.WithInsecure(),
		grpc.WithContextDialer(dialer.ContextDialer))
	if err != nil {
		_ = s.stop()
		return nil, nil, fmt.Errorf("cannot dial %s: %w", socket, err)
	}
	s.conn = conn
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), pluginName)
	return sn, s.stop, nil
}

func (s *snapshotter) waitListening(socket string) error {
	deadline := time.Now().Add(startTimeout)
	for {
		select {
		case <-s.exited:
			return fmt.Errorf("stargaze-snapshotter exited at start (%v); see %s", s.cmd.ProcessState, s.log)
		default:
		}
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("stargaze-snapshotter did not listen on %s within %v; see %s", socket, startTimeout, s.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop closes the client and stops the process as systemd would (SIGTERM,
// then SIGKILL). A snapshotter that did not exit cleanly fails the case.
func (s *snapshotter) stop() error {
	if s.conn != nil {
		_ = s.conn.Close()
		s.conn = nil
	}
	select {
	case <-s.exited:
	default:
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(stopTimeout):
			_ = s.cmd.Process.Kill()
			<-s.exited
			return fmt.Errorf("stargaze-snapshotter pid %d did not exit within %v of SIGTERM; see %s",
				s.cmd.Process.Pid, stopTimeout, s.log)
		}
	}
	if !s.cmd.ProcessState.Success() {
		return errors.New("stargaze-snapshotter " + s.cmd.ProcessState.String() + "; see " + s.log)
	}
	return nil
}
