package sessions

import (
	"testing"

	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
)

// TestClusterCountPending: `drained` needs the cluster's count. While a
// shared store using an upstream has not read it (Redis down since the
// store opened), the count is pending; once Redis answers and the count
// is read, it is not, and an upstream the store does not use never is.
func TestClusterCountPending(t *testing.T) {
	rd := testredis.Start(t)
	rd.Stop()
	_, dials := upstreams(t, 2)
	h := instance(t, rd.Addr, "pending", "ns", 60, 1000)
	h.Refresh(dials[:1])
	if !h.store.ClusterCountPending(dials[0]) {
		t.Fatal("Redis down since the store opened: the cluster's count of an upstream it uses is not pending")
	}
	if h.store.ClusterCountPending(dials[1]) {
		t.Error("pending for an upstream the store does not use")
	}
	rd.Run(t)
	waitUntil(t, "the first count", func() bool {
		h.Refresh(dials[:1])
		return !h.store.ClusterCountPending(dials[0])
	})
}
