package testredis

import "syscall"

// procAttr makes the kernel kill a topology node when the test binary
// dies (a panic, a timeout's os.Exit), so that no redis-server outlives
// its test.
func procAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
