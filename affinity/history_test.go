package affinity

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func histValues(s HistorySeries) []string {
	out := make([]string, len(s.Sessions))
	for i, v := range s.Sessions {
		if v == nil {
			out[i] = "-"
		} else {
			out[i] = fmt.Sprint(*v)
		}
	}
	return out
}

// Failovers are charted per interval: each point says how many happened
// since the point before it, the live point since the latest sample.
func TestHistoryFailoverDeltas(t *testing.T) {
	h := &history{lastTotal: 5} // the farm started when 5 had happened
	t0 := time.Unix(1_000_000, 0)
	ups := []upstreamSample{{"a:80", 1}}
	for i, total := range []uint64{5, 5, 8, 8, 15} {
		h.add(t0.Add(time.Duration(i)*historyInterval), total, ups, 0)
	}
	s := h.snapshot(t0.Add(70*time.Second), ups, 17, 0)
	if got, want := fmt.Sprint(s.Failovers), "[0 0 3 0 7 2]"; got != want {
		t.Errorf("failovers per interval %s, want %s", got, want)
	}
	if len(s.Times) != 6 || !s.Times[5].Equal(t0.Add(70*time.Second)) || !s.Times[0].Equal(t0) {
		t.Errorf("times %v", s.Times)
	}
	if s.IntervalSeconds != 15 || s.WindowSeconds != 900 {
		t.Errorf("interval %d, window %d", s.IntervalSeconds, s.WindowSeconds)
	}
}

// The ring keeps the last 60 samples (15 minutes), oldest first, and an
// upstream added later has no value (null) before it was known.
func TestHistoryRingWraps(t *testing.T) {
	h := &history{}
	t0 := time.Unix(2_000_000, 0)
	const taken = historyPoints + 13
	for i := range taken {
		ups := []upstreamSample{{"b:80", int64(i)}}
		if i >= taken-3 {
			ups = append(ups, upstreamSample{"a:80", int64(100 + i)})
		}
		h.add(t0.Add(time.Duration(i)*historyInterval), uint64(2*i), ups, 0)
	}
	now := t0.Add(taken * historyInterval)
	s := h.snapshot(now, []upstreamSample{{"a:80", 7}, {"b:80", 8}}, uint64(2*taken), 0)
	if len(s.Times) != historyPoints+1 {
		t.Fatalf("%d points, want %d samples + now", len(s.Times), historyPoints+1)
	}
	if first := t0.Add(13 * historyInterval); !s.Times[0].Equal(first) {
		t.Errorf("oldest point at %v, want %v (the 14th sample)", s.Times[0], first)
	}
	for k := 1; k < len(s.Times); k++ {
		if !s.Times[k].After(s.Times[k-1]) {
			t.Fatalf("points out of order at %d: %v", k, s.Times)
		}
	}
	for k, f := range s.Failovers {
		if f != 2 {
			t.Fatalf("failovers at point %d: %d, want 2 (each interval); all %v", k, f, s.Failovers)
		}
	}
	if len(s.Upstreams) != 2 || s.Upstreams[0].Upstream != "a:80" || s.Upstreams[1].Upstream != "b:80" {
		t.Fatalf("series %+v, want a:80 then b:80", s.Upstreams)
	}
	a, b := histValues(s.Upstreams[0]), histValues(s.Upstreams[1])
	if got := strings.Join(a[historyPoints-4:], " "); got != "- 170 171 172 7" {
		t.Errorf("a:80 ends with %s, want nulls until it was added", got)
	}
	if a[0] != "-" || b[0] != "13" || b[historyPoints-1] != "72" || b[historyPoints] != "8" {
		t.Errorf("a:80 %v\nb:80 %v", a, b)
	}
}

// Once the ring is full, a sample reuses its slot's slice: the farm's
// loop allocates nothing for the history in steady state but what
// healthcheck.All returns.
func TestHistoryAddDoesNotAllocate(t *testing.T) {
	h := &history{}
	ups := make([]upstreamSample, historyMaxUpstreams)
	now := time.Unix(3_000_000, 0)
	for range historyPoints {
		h.add(now, 0, ups, 0)
	}
	if n := testing.AllocsPerRun(100, func() { h.add(now, 0, ups, 0) }); n != 0 {
		t.Errorf("add allocates %v times a sample", n)
	}
}

// The farm samples from its loop: its first look takes the first sample,
// and History adds the present moment.
func TestHistoryFromTheFarm(t *testing.T) {
	listen, dial := inProcessAddrs(t)
	config := fmt.Sprintf(`{"admin":{"disabled":true,"config":{"persist":false}},
"storage":{"module":"file_system","root":%q},
"apps":{"http":{"servers":{"s":{"listen":[%q],"routes":[{"handle":[
{"handler":"reverse_proxy","upstreams":[{"dial":%q}],"load_balancing":{"selection_policy":
{"policy":"affinity","secret":"s"}}}]}]}}}}}`, t.TempDir(), listen, dial)
	if History() != nil {
		t.Fatal("a history before any policy")
	}
	if err := caddy.Load([]byte(config), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	var s *HistorySnapshot
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if s = History(); s != nil && len(s.Times) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no sample within 5 s: %+v", s)
		}
	}
	var series *HistorySeries
	for i := range s.Upstreams {
		if s.Upstreams[i].Upstream == dial {
			series = &s.Upstreams[i]
		}
	}
	if series == nil || len(series.Sessions) != 2 || series.Sessions[0] == nil || series.Sessions[1] == nil {
		t.Fatalf("no series for %s in %+v", dial, s)
	}
	// The next sample is 15 s later, not at the next look.
	f := liveFarm.Load()
	f.history.tick(s.Times[0].Add(historyInterval-time.Second), f.table)
	if n := len(History().Times); n != 2 {
		t.Errorf("a sample before the interval was up: %d points", n)
	}
	f.history.tick(s.Times[0].Add(historyInterval), f.table)
	if n := len(History().Times); n != 3 {
		t.Errorf("no sample when the interval was up: %d points", n)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if History() != nil {
		t.Error("a history after the farm stopped")
	}
}

// add records a sample taken at now, with the failover total then.
func (h *history) add(now time.Time, total uint64, ups []upstreamSample, omitted int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.addLocked(now, total, ups, omitted)
}
