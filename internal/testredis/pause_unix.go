//go:build unix

package testredis

import (
	"syscall"
	"testing"
)

// Pause freezes the server (SIGSTOP): it keeps its connections open and
// answers nothing, as a hung server or a network that drops packets
// does. Call the returned resume (SIGCONT); the test's end resumes it
// too, before the server is killed.
func (s *Server) Pause(t testing.TB) (resume func()) {
	t.Helper()
	return pause(t, s.cmd.Process.Pid)
}

// Pause freezes the node (SIGSTOP); see Server.Pause.
func (n *Node) Pause(t testing.TB) (resume func()) {
	t.Helper()
	return pause(t, n.cmd.Process.Pid)
}

func pause(t testing.TB, pid int) func() {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("SIGSTOP %d: %v", pid, err)
	}
	resume := func() { _ = syscall.Kill(pid, syscall.SIGCONT) }
	t.Cleanup(resume)
	return resume
}
