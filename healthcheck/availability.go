package healthcheck

import (
	"sync"
	"time"
)

// Availability bookkeeping for `hold` and `slow_start`. The policy reports
// what it sees; these methods turn the reports into "how long has this
// upstream been in trouble" and "how long has it been back".

// NoteTrouble records that the upstream could not serve a request at now
// (a failed attempt, or Caddy's health checks say it is down). Reports
// closer together than gap belong to one incident; the first report after
// a quiet gap starts a new one. It returns how long the current incident
// has lasted.
func (u *Upstream) NoteTrouble(now time.Time, gap time.Duration) time.Duration {
	ns := now.UnixNano()
	last := u.troubleLast.Swap(ns)
	if last == 0 || ns-last > int64(gap) {
		u.troubleStart.Store(ns)
		return 0
	}
	start := u.troubleStart.Load()
	if start == 0 || start > ns {
		return 0
	}
	return time.Duration(ns - start)
}

// MarkBack records that the upstream just became able to take new
// sessions again (recovered, returned to up, or added to a running
// config), which starts its slow-start ramp.
func (u *Upstream) MarkBack(now time.Time) { u.backSince.Store(now.UnixNano()) }

// BackFor returns how long ago the upstream last came back, or a very
// long time if it never left.
func (u *Upstream) BackFor(now time.Time) time.Duration {
	ns := u.backSince.Load()
	if ns == 0 {
		return 1<<63 - 1
	}
	return time.Duration(now.UnixNano() - ns)
}

// Discovery: admin routers are built before any app is provisioned and
// the policy only sees its upstreams per request, so the admin API asks
// the policy package to find the upstreams of the running config before
// it answers, and an upstream can be drained before its first request.
var discoverers struct {
	sync.Mutex
	fns []func()
}

// RegisterDiscoverer adds a function that registers (with Get) the
// upstreams of the running config. The admin API calls every registered
// function before answering.
func RegisterDiscoverer(f func()) {
	discoverers.Lock()
	defer discoverers.Unlock()
	discoverers.fns = append(discoverers.fns, f)
}

func discover() {
	discoverers.Lock()
	fns := append([]func(){}, discoverers.fns...)
	discoverers.Unlock()
	for _, f := range fns {
		f()
	}
}
