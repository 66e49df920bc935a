package affinity

import (
	"sort"
	"sync"
	"time"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// The status page's chart: live sessions per upstream and failovers over
// the last 15 minutes, so that a drain emptying an upstream or a burst of
// failovers is seen at a glance rather than read from numbers. The farm
// samples from its own loop (no goroutine of its own, nothing on the
// request path); the page reads the samples with History.

const (
	// historyInterval is the time between two samples, historyPoints how
	// many are kept: 15 minutes.
	historyInterval = 15 * time.Second
	historyPoints   = 60
	// historyMaxUpstreams bounds the upstreams a sample records (the
	// first ones by dial address, as the status page lists them): more
	// lines than that make no readable chart, and it keeps the history's
	// memory bounded (60 × 32 × 24 bytes) whatever the config holds.
	historyMaxUpstreams = 32
)

// upstreamSample is one upstream's live sessions at a sample.
type upstreamSample struct {
	dial string // shared with healthcheck's record: no copy
	n    int64
}

// historySample is one point of the history.
type historySample struct {
	at time.Time
	// failovers is how many failovers happened since the previous sample
	// (the delta, stored so that it survives the ring overwriting the
	// previous sample).
	failovers uint64
	ups       []upstreamSample // reused when the ring wraps
	omitted   int              // upstreams beyond historyMaxUpstreams
}

// history is a ring buffer of samples, owned by the farm.
type history struct {
	mu      sync.Mutex
	samples [historyPoints]historySample
	next    int // where the next sample goes
	n       int // samples held, up to historyPoints
	// lastTotal is the failover total at the previous sample (at the
	// farm's start before the first), so that failovers of an earlier
	// farm in the same process are not charted as a burst.
	lastTotal uint64
	last      time.Time // when the previous sample was taken; zero before the first
	scratch   []upstreamSample
}

// newHistory starts a history at the current failover total.
func newHistory() *history {
	return &history{lastTotal: failovers.count()}
}

// tick takes a sample when one is due: every historyInterval, the first
// one as soon as the farm knows an upstream (its first look at the
// config; before it there is nothing to chart). The farm's loop calls it
// after each look.
func (h *history) tick(now time.Time, t *sessions.Table) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.last.IsZero() && now.Sub(h.last) < historyInterval {
		return
	}
	var omitted int
	h.scratch, omitted = collectSessions(h.scratch[:0], t)
	if h.last.IsZero() && len(h.scratch) == 0 {
		return
	}
	h.addLocked(now, failovers.count(), h.scratch, omitted)
}

// addLocked records a sample taken at now, with the failover total
// then; h.mu is held.
func (h *history) addLocked(now time.Time, total uint64, ups []upstreamSample, omitted int) {
	s := &h.samples[h.next]
	s.at = now
	s.failovers = total - min(h.lastTotal, total)
	s.ups = append(s.ups[:0], ups...)
	s.omitted = omitted
	h.lastTotal, h.last = total, now
	h.next = (h.next + 1) % historyPoints
	if h.n < historyPoints {
		h.n++
	}
}

// collectSessions appends the live sessions of the known upstreams, by
// dial address, to dst, and says how many upstreams were left out.
func collectSessions(dst []upstreamSample, t *sessions.Table) ([]upstreamSample, int) {
	all := healthcheck.All()
	omitted := max(0, len(all)-historyMaxUpstreams)
	for _, u := range all[:len(all)-omitted] {
		dst = append(dst, upstreamSample{dial: u.Dial, n: max(0, t.LiveCount(u.ID))})
	}
	return dst, omitted
}

// HistorySnapshot is the history as the status page charts it: points
// oldest first, 15 s apart, then one for the moment of the answer.
type HistorySnapshot struct {
	// IntervalSeconds is the time between two samples, WindowSeconds the
	// span the history covers when full.
	IntervalSeconds int `json:"interval_seconds"`
	WindowSeconds   int `json:"window_seconds"`
	// Times are the points' times, oldest first; the last one is now (the
	// moment of the answer, not a stored sample).
	Times []time.Time `json:"times"`
	// Upstreams is one series per upstream seen in the window, by dial
	// address.
	Upstreams []HistorySeries `json:"upstreams"`
	// Failovers is, for each point, how many failovers happened since the
	// point before it (for the first point, since the sample before it,
	// now out of the window; for the last, since the latest sample).
	Failovers []uint64 `json:"failovers"`
	// Omitted is how many upstreams the latest point leaves out (beyond
	// the first 32 by dial address).
	Omitted int `json:"omitted"`
}

// HistorySeries is one upstream's live sessions at each point of the
// snapshot; null where the upstream was not known (before it was added).
type HistorySeries struct {
	Upstream string   `json:"upstream"`
	Sessions []*int64 `json:"sessions"`
}

// History returns the last 15 minutes of live sessions per upstream and
// failovers, plus the present moment; nil before any policy is
// provisioned. It allocates the answer: it is for the admin API, not for
// the request path.
func History() *HistorySnapshot {
	f := liveFarm.Load()
	if f == nil || f.history == nil {
		return nil
	}
	live, omitted := collectSessions(nil, f.table)
	return f.history.snapshot(time.Now(), live, failovers.count(), omitted)
}

// snapshot returns the samples, oldest first, then the point now with
// the given live sessions and failover total.
func (h *history) snapshot(now time.Time, live []upstreamSample, total uint64, omitted int) *HistorySnapshot {
	h.mu.Lock()
	defer h.mu.Unlock()
	points := h.n + 1
	out := &HistorySnapshot{
		IntervalSeconds: int(historyInterval / time.Second),
		WindowSeconds:   int(historyInterval * historyPoints / time.Second),
		Times:           make([]time.Time, 0, points),
		Failovers:       make([]uint64, 0, points),
		Upstreams:       []HistorySeries{},
		Omitted:         omitted,
	}
	// One series per dial in any point; values in one backing array.
	index := make(map[string]int)
	each := func(fn func(i int, ups []upstreamSample)) {
		for k := 0; k < h.n; k++ {
			fn(k, h.samples[(h.next-h.n+k+historyPoints)%historyPoints].ups)
		}
		fn(h.n, live)
	}
	each(func(_ int, ups []upstreamSample) {
		for _, u := range ups {
			if _, ok := index[u.dial]; !ok {
				index[u.dial] = len(out.Upstreams)
				out.Upstreams = append(out.Upstreams, HistorySeries{Upstream: u.dial})
			}
		}
	})
	sort.Slice(out.Upstreams, func(i, j int) bool { return out.Upstreams[i].Upstream < out.Upstreams[j].Upstream })
	for i, s := range out.Upstreams {
		index[s.Upstream] = i
	}
	values := make([]int64, len(out.Upstreams)*points)
	for i := range out.Upstreams {
		out.Upstreams[i].Sessions = make([]*int64, points)
	}
	each(func(k int, ups []upstreamSample) {
		for _, u := range ups {
			i := index[u.dial]
			v := &values[i*points+k]
			*v = u.n
			out.Upstreams[i].Sessions[k] = v
		}
	})
	for k := 0; k < h.n; k++ {
		s := &h.samples[(h.next-h.n+k+historyPoints)%historyPoints]
		out.Times = append(out.Times, s.at.UTC())
		out.Failovers = append(out.Failovers, s.failovers)
	}
	out.Times = append(out.Times, now.UTC())
	out.Failovers = append(out.Failovers, total-min(h.lastTotal, total))
	return out
}

// count returns the number of failovers recorded since the process
// started.
func (l *failoverLog) count() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
}
