//go:build !linux

package testredis

import "syscall"

// procAttr: only Linux can kill a child when its parent dies; elsewhere
// the test's Cleanup alone stops the nodes.
func procAttr() *syscall.SysProcAttr { return nil }
