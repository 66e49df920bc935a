package affinity

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/caddyserver/certmagic"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// farm is what every affinity policy of the process shares, and the one
// owner of the module's background work:
//
//   - the session table (a reload hands it to the new config: no session
//     is forgotten) and the bound on it that the live policies ask for;
//   - a loop that keeps the table clock, looks at the running config
//     every second (Sites: every reverse_proxy that uses the policy, with
//     its upstreams) so that healthcheck knows the upstreams and their
//     health before any request, starts and follows each policy's drain
//     probe, and sweeps expired sessions every two seconds;
//   - the state syncer of each live policy's storage (healthcheck's,
//     shared by the policies of one storage), and the probes' pending
//     undrains, which it runs at once when it stops rather than leaving
//     timers behind.
//
// It lives in a caddy.UsagePool: the first policy provisioned starts it,
// the last one cleaned up stops it, with everything it started. A reload
// provisions the new config before it cleans up the old one, so the farm
// goes on across reloads.
type farm struct {
	// store is the session memory: the table, the snapshot of store
	// local and the clients of shared stores.
	store *sessions.Store
	table *sessions.Table

	mu     sync.Mutex
	wants  map[*Policy]int          // max_sessions asked by each live policy
	probes map[*Policy]*policyProbe // the running probe of each policy
	// syncers releases the state syncer each live policy joined.
	syncers map[*Policy]func()
	// dials is the last pool's upstreams of each proxy, by scope: the
	// upstreams a reload removes are told apart from unknown ones.
	dials map[uint64][]string

	history *history // the status page's chart, sampled by loop

	stop, done chan struct{}
}

// policyProbe is one policy's drain probe and the upstreams it probes.
type policyProbe struct {
	ups  reverseproxy.UpstreamPool
	stop func()
}

var (
	farms = caddy.NewUsagePool()
	// liveFarm is the farm in the pool, for the admin API and metrics
	// scrapes, which have no policy at hand.
	liveFarm atomic.Pointer[farm]
)

const farmKey = "farm"

// Intervals of the farm's loop.
const (
	clockInterval = 250 * time.Millisecond
	lookInterval  = time.Second
	sweepInterval = 2 * time.Second
)

// acquireFarm joins (or starts) the farm for policy p, and joins the
// state syncer of p's storage: states set through the admin API on any
// instance sharing it apply here too.
func acquireFarm(p *Policy) (*farm, error) {
	var releaseSyncer func()
	if storageOf(p.ctx) != nil {
		release, err := healthcheck.AcquireSyncer(p.ctx)
		if err != nil {
			return nil, fmt.Errorf("upstream state syncer: %v", err)
		}
		releaseSyncer = release
	}
	val, _, err := farms.LoadOrNew(farmKey, func() (caddy.Destructor, error) {
		store := sessions.NewStore(p.MaxSessions)
		f := &farm{
			store:   store,
			table:   store.Table(),
			wants:   make(map[*Policy]int),
			probes:  make(map[*Policy]*policyProbe),
			syncers: make(map[*Policy]func()),
			stop:    make(chan struct{}),
			done:    make(chan struct{}),
		}
		f.history = newHistory()
		sessions.SetClock(sessions.Seconds(time.Now()))
		go f.loop()
		liveFarm.Store(f)
		return f, nil
	})
	if err != nil {
		if releaseSyncer != nil {
			releaseSyncer()
		}
		return nil, err
	}
	f := val.(*farm)
	if releaseSyncer != nil {
		f.mu.Lock()
		f.syncers[p] = releaseSyncer
		f.mu.Unlock()
	}
	f.want(p, p.MaxSessions)
	// The policy's namespace, known here in Provision. The first policy
	// with store local reads the snapshot back, before the config serves
	// its first request; a shared store's client is the farm's, shared
	// by the policies that name it.
	scope, ns := p.namespaces(p.ctx)
	p.namespace = ns
	h, err := f.store.Open(sessions.Options{
		Config: p.Store, Scope: scope, Namespace: ns,
		TTL: p.ttl, MaxSessions: p.MaxSessions,
		Logger: p.logger.Named("store"), Storage: storageOf(p.ctx),
	})
	if err != nil {
		f.release(p)
		return nil, err
	}
	p.sessions = h
	return f, nil
}

// release lets go of the farm for policy p: its probe stops, its
// syncer is released, its bound no longer counts, and the last release
// stops the farm.
func (f *farm) release(p *Policy) {
	f.mu.Lock()
	pr := f.probes[p]
	delete(f.probes, p)
	releaseSyncer := f.syncers[p]
	delete(f.syncers, p)
	f.mu.Unlock()
	if pr != nil {
		pr.stop()
	}
	if releaseSyncer != nil {
		releaseSyncer()
	}
	// The last policy with store local writes the table (shutdown); the
	// last of a shared store's client closes it.
	if p.sessions != nil {
		p.sessions.Close()
	}
	f.want(p, 0)
	_, _ = farms.Delete(farmKey)
}

// want records the bound a policy asks for (0 removes it) and applies the
// largest one.
func (f *farm) want(p *Policy, maxSessions int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if maxSessions > 0 {
		f.wants[p] = maxSessions
	} else {
		delete(f.wants, p)
	}
	largest := 0
	for _, n := range f.wants {
		largest = max(largest, n)
	}
	if largest > 0 {
		f.table.SetMax(largest)
	}
}

func (f *farm) loop() {
	defer close(f.done)
	tick := time.NewTicker(clockInterval)
	defer tick.Stop()
	for n := 1; ; n++ {
		select {
		case <-f.stop:
			return
		case now := <-tick.C:
			sessions.SetClock(sessions.Seconds(now))
			if n%int(lookInterval/clockInterval) == 0 {
				f.look(now)
				f.history.tick(now, f.table)
			}
			if n%int(sweepInterval/clockInterval) == 0 {
				f.table.Sweep(sessions.Seconds(now))
			}
		}
	}
}

// look looks at the running config once and returns its sites: every
// upstream is observed by healthcheck (registered, its health tracked,
// its slow-start and hold clocks kept, marked as configured), the
// upstreams no config has used for a while are forgotten unless the
// table holds live sessions for them, and every policy's probe follows
// the policy's upstreams.
func (f *farm) look(now time.Time) []Site {
	sites, running := observeRunning(now, func(id uint32) bool { return f.table.LiveCount(id) > 0 })
	if !running {
		return nil
	}
	for _, s := range sites {
		s.Policy.checkSite(s)
		f.followProbe(s.Policy, siteUpstreams(s), s.Handler.DynamicUpstreams != nil)
		// A shared store's cluster counts, read in the background, and a
		// write back when it lost sessions (restart, outage).
		if s.Policy.sessions != nil {
			s.Policy.sessions.Refresh(siteDials(s))
		}
	}
	return sites
}

// siteDials returns a site's upstreams: its configured ones, or those of
// its policy's last pool when they are dynamic.
func siteDials(s Site) []string {
	ups := s.Handler.Upstreams
	if len(ups) == 0 {
		if ps := s.Policy.pools.Load(); ps != nil {
			ups = ps.Ups
		}
	}
	dials := make([]string, len(ups))
	for i, u := range ups {
		dials[i] = u.Dial
	}
	return dials
}

// replaceDials records pool as the upstreams of the proxy of the given
// scope and returns the ones it had before.
func (f *farm) replaceDials(scope uint64, pool reverseproxy.UpstreamPool) []string {
	dials := make([]string, len(pool))
	for i, u := range pool {
		dials[i] = u.Dial
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.dials == nil {
		f.dials = make(map[uint64][]string)
	}
	prev := f.dials[scope]
	f.dials[scope] = dials
	return prev
}

// siteUpstreams are the upstreams a site's probe follows: the static
// ones, or for a dynamic source those of the last pool its policy saw
// (the config walk cannot see them).
func siteUpstreams(s Site) reverseproxy.UpstreamPool {
	if s.Handler.DynamicUpstreams != nil {
		if ps := s.Policy.pools.Load(); ps != nil {
			return ps.Ups
		}
	}
	return s.Handler.Upstreams
}

// followProbe (re)starts a policy's drain probe when its set of
// upstreams changed. On dynamic upstreams the probe also takes a silent
// upstream out (Probe.StartDynamic): Caddy's active checks do not run
// there.
func (f *farm) followProbe(p *Policy, ups reverseproxy.UpstreamPool, dynamic bool) {
	if p.Probe == nil {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, live := f.wants[p]; !live || f.probes == nil {
		return // cleaned up: a config on its way out, or the farm stopped
	}
	old := f.probes[p]
	if old != nil && sameDials(old.ups, ups) {
		return
	}
	dials := make([]string, len(ups))
	for i, u := range ups {
		dials[i] = u.Dial
	}
	start := p.Probe.Start
	if dynamic {
		start = p.Probe.StartDynamic
	}
	f.probes[p] = &policyProbe{ups: ups, stop: start(p.ctx, dials, p.logger)}
	if old != nil {
		old.stop()
	}
}

// Destruct stops the loop, every probe and syncer when the last policy
// lets go, and runs the probes' pending undrains now: no config probes
// them any more, and no timer of the module may outlive it.
func (f *farm) Destruct() error {
	liveFarm.CompareAndSwap(f, nil)
	close(f.stop)
	<-f.done
	f.mu.Lock()
	probes, syncers := f.probes, f.syncers
	f.probes, f.syncers = nil, nil
	f.mu.Unlock()
	for _, pr := range probes {
		pr.stop()
	}
	for _, release := range syncers {
		release()
	}
	healthcheck.RunPendingUndrains()
	f.store.Close()
	sessions.SetClock(0)
	return nil
}

// observeRunning hands the running config's upstreams to healthcheck
// (Observe), then lets it forget those no config has used for its grace
// and busy does not keep (Expire), and returns the config's sites. The
// upstreams of a proxy with dynamic upstreams are those of the last pool
// its policy used: the config walk cannot see them, and without this
// they would count as unused while they serve.
func observeRunning(now time.Time, busy func(id uint32) bool) ([]Site, bool) {
	sites, running := runningSites()
	if !running {
		// Nothing to observe; the upstreams of the config the process
		// starts with must not be taken for added ones.
		return nil, false
	}
	var ups []*reverseproxy.Upstream
	for _, s := range sites {
		if len(s.Handler.Upstreams) > 0 {
			ups = append(ups, s.Handler.Upstreams...)
		} else if ps := s.Policy.pools.Load(); ps != nil {
			ups = append(ups, ps.Ups...)
		}
	}
	healthcheck.Observe(ups, now)
	healthcheck.Expire(now, busy)
	return sites, true
}

// Refresh looks at the running config now, as the farm does every
// second, and returns its sites: the admin API calls it so that its
// answers never wait for the next look. Without a farm (no affinity
// policy in the running config) it still tells healthcheck that none of
// the upstreams it knows is configured; there is no session table then.
func Refresh() []Site {
	if f := liveFarm.Load(); f != nil {
		return f.look(time.Now())
	}
	sites, _ := observeRunning(time.Now(), nil)
	return sites
}

// LiveSessions returns the live sessions pinned to the upstream with the
// given healthcheck ID: session-table entries within their TTL, exact at
// the moment of the call (a session known by several keys counts once).
// Under store redis it is the cluster's count when that is more (read
// every second; a session counts until Redis lets it go, a quarter TTL
// after it may have ended), so that `drained` means drained on every
// instance.
func LiveSessions(id uint32) int64 {
	f := liveFarm.Load()
	if f == nil {
		return 0
	}
	n := max(0, f.table.LiveCount(id))
	if u := healthcheck.ByID(id); u != nil {
		if c, ok := f.store.ClusterSessions(u.Dial); ok {
			n = max(n, c)
		}
	}
	return n
}

// ClusterCountKnown reports whether LiveSessions of the upstream is the
// cluster's count: false while a shared store (store redis) using it has
// not read the cluster's count yet, when the upstream may hold sessions
// of other instances that this one does not know. `drained` needs it.
func ClusterCountKnown(id uint32) bool {
	f := liveFarm.Load()
	if f == nil {
		return true
	}
	u := healthcheck.ByID(id)
	return u == nil || !f.store.ClusterCountPending(u.Dial)
}

// TableStats is the session table's size.
type TableStats struct {
	Entries   int    `json:"entries"`
	Evictions uint64 `json:"evictions"`
}

// Table returns the session table's size, or nil before any policy is
// provisioned.
func Table() *TableStats {
	f := liveFarm.Load()
	if f == nil {
		return nil
	}
	return &TableStats{Entries: f.table.Len(), Evictions: f.table.Evicted()}
}

var _ caddy.Destructor = (*farm)(nil)

// storageOf returns the config's storage, or nil for a context that
// belongs to no config (Context.Storage panics on those; unit tests
// provision policies that way).
func storageOf(ctx caddy.Context) (s certmagic.Storage) {
	defer func() {
		if recover() != nil {
			s = nil
		}
	}()
	return ctx.Storage()
}
