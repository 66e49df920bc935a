package affinity

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// upstreamSeries returns the per-upstream gauges the collector reports
// for dial, by metric name.
func upstreamSeries(t *testing.T, dial string) []string {
	t.Helper()
	ch := make(chan prometheus.Metric, 1024)
	go func() {
		upstreamCollector{}.Collect(ch)
		close(ch)
	}()
	var names []string
	for m := range ch {
		var pb dto.Metric
		if err := m.Write(&pb); err != nil {
			t.Fatal(err)
		}
		for _, l := range pb.GetLabel() {
			if l.GetName() == "upstream" && l.GetValue() == dial {
				desc := m.Desc().String()
				name, _, _ := strings.Cut(strings.TrimPrefix(desc, `Desc{fqName: "`), `"`)
				names = append(names, name)
			}
		}
	}
	return names
}

// The per-upstream series of an upstream no config uses any more go away
// when healthcheck forgets it, not only when the process restarts.
func TestUpstreamSeriesGoWhenForgotten(t *testing.T) {
	dial := t.Name() + ":80"
	u := healthcheck.Get(dial)
	if got := upstreamSeries(t, dial); len(got) != 2 {
		t.Fatalf("series of a known upstream: %v, want caddy_affinity_sessions and caddy_affinity_upstream_state", got)
	}
	// An hour on, with every other upstream of the process kept (as if
	// busy), this one is forgotten.
	healthcheck.Expire(time.Now().Add(time.Hour), func(id uint32) bool { return id != u.ID })
	if got := upstreamSeries(t, dial); len(got) != 0 {
		t.Errorf("series of a forgotten upstream: %v", got)
	}
}
