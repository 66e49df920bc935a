//go:build unix

package testredis

import (
	"syscall"
	"testing"
	"time"
)

// Pause freezes the server (SIGSTOP): it keeps its connections open and
// answers nothing, as a hung server or a network that drops packets
// does. Call the returned resume (SIGCONT); the test's end resumes it
// too, before the server is killed.
func (s *Server) Pause(t testing.TB) (resume func()) {
	t.Helper()
	return pause(t, s.cmd.Process.Pid)
}

// Pause freezes the node (SIGSTOP); see Server.Pause. The topology
// helpers leave a frozen node alone.
func (n *Node) Pause(t testing.TB) (resume func()) {
	t.Helper()
	n.frozen.Store(true)
	cont := pause(t, n.cmd.Process.Pid)
	return func() {
		cont()
		n.frozen.Store(false)
	}
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

// FreezeMaster SIGSTOPs the master (a master cut off from everyone, or
// hung) and waits until the sentinels have promoted the replica, as
// KillMaster does. resume (SIGCONT) brings the old master back, which
// the sentinels then turn into a replica of the new one (see
// WaitReplica).
func (s *Sentinel) FreezeMaster(t testing.TB) (took time.Duration, resume func()) {
	t.Helper()
	old := s.Master
	took = s.failover(t, func() { resume = old.Pause(t) })
	return took, resume
}

// FreezeMaster SIGSTOPs master (a master cut off from everyone, or hung)
// and waits until its replica has taken over, as KillMaster does.
// resume (SIGCONT) brings the old master back, which the cluster then
// turns into a replica of the promoted one (see WaitReplica).
func (c *Cluster) FreezeMaster(t testing.TB, master *Node) (promoted *Node, took time.Duration, resume func()) {
	t.Helper()
	promoted, took = c.failover(t, master, func() { resume = master.Pause(t) })
	return promoted, took, resume
}
