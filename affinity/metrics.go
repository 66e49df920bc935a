package affinity

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// The values of the selections metric's `outcome` label that are not an
// outcome's (outcomeRow.label): counted besides the request's outcome.
const (
	labelDrainSkip    = "drain_skip"    // placement walked past a draining or maintenance upstream
	labelOverloadSkip = "overload_skip" // placement walked past an upstream at its balance_factor bound
)

// metrics are process-wide: the counters are registered into every new
// config's registry (each config load gets a fresh one), so they appear on
// Caddy's /metrics and keep counting across reloads. Per-upstream gauges
// are read at scrape time from the healthcheck registry, so no request
// pays for them, and the series of an upstream no config uses goes away
// when the registry forgets it (healthcheck.Expire: 10 minutes after its
// last use, once it has no live session). No label is ever per session.
var metrics = struct {
	once       sync.Once
	selections *prometheus.CounterVec
	// byOutcome is the counter of each outcome's label (outcomes).
	byOutcome      [numOutcomes]prometheus.Counter
	drainSkip      prometheus.Counter
	overloadSkip   prometheus.Counter
	rejectedPins   prometheus.Counter
	upstreamGauges *upstreamCollector
}{}

func initMetrics() {
	metrics.once.Do(func() {
		metrics.selections = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "affinity", Name: "selections_total",
			Help: "Upstream selections by outcome: " + outcomeLabels() + "; and drain_skip, overload_skip for placements that walked past an upstream for its state or its balance_factor bound.",
		}, []string{"outcome"})
		// Resolved once, so that counting on the request path is one
		// atomic add and no label lookup.
		for o := range metrics.byOutcome {
			metrics.byOutcome[o] = metrics.selections.WithLabelValues(outcomes[o].label)
		}
		metrics.drainSkip = metrics.selections.WithLabelValues(labelDrainSkip)
		metrics.overloadSkip = metrics.selections.WithLabelValues(labelOverloadSkip)
		metrics.rejectedPins = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "affinity", Name: "rejected_pins_total",
			Help: "Pin cookies that were present but not valid (forged, stale secret, unknown upstream).",
		})
		metrics.upstreamGauges = new(upstreamCollector)
	})
}

// stateValues lists the values of the state gauge: "0 up, 1 draining...".
func stateValues() string {
	values := make([]string, len(healthcheck.States))
	for i, st := range healthcheck.States {
		values[i] = fmt.Sprintf("%d %s", st.State, st.Name)
	}
	return strings.Join(values, ", ")
}

// outcomeLabels lists the outcomes' labels, each once, for the help.
func outcomeLabels() string {
	var labels []string
	for _, row := range outcomes {
		if !slices.Contains(labels, row.label) {
			labels = append(labels, row.label)
		}
	}
	return strings.Join(labels, ", ")
}

// registerMetrics registers the collectors into a config's registry,
// accepting that another affinity policy of the same config did already.
func registerMetrics(reg *prometheus.Registry) error {
	initMetrics()
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{metrics.selections, metrics.rejectedPins, metrics.upstreamGauges} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}

var (
	descSessions = prometheus.NewDesc("caddy_affinity_sessions",
		"Live sessions pinned to the upstream (session-table entries within their TTL).", []string{"upstream"}, nil)
	descState = prometheus.NewDesc("caddy_affinity_upstream_state",
		"Lifecycle state of the upstream: "+stateValues()+".", []string{"upstream"}, nil)
	descTableSize = prometheus.NewDesc("caddy_affinity_session_table_entries",
		"Entries in the session table.", nil, nil)
	descEvictions = prometheus.NewDesc("caddy_affinity_session_table_evictions_total",
		"Live session-table entries evicted because the table was full.", nil, nil)
)

// upstreamCollector reports the per-upstream and table gauges at scrape
// time.
type upstreamCollector struct{}

func (upstreamCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descSessions
	ch <- descState
	ch <- descTableSize
	ch <- descEvictions
}

func (upstreamCollector) Collect(ch chan<- prometheus.Metric) {
	for _, u := range healthcheck.All() {
		ch <- prometheus.MustNewConstMetric(descSessions, prometheus.GaugeValue, float64(LiveSessions(u.ID)), u.Dial)
		ch <- prometheus.MustNewConstMetric(descState, prometheus.GaugeValue, float64(u.State()), u.Dial)
	}
	if st := Table(); st != nil {
		ch <- prometheus.MustNewConstMetric(descTableSize, prometheus.GaugeValue, float64(st.Entries))
		ch <- prometheus.MustNewConstMetric(descEvictions, prometheus.CounterValue, float64(st.Evictions))
	}
}

// count counts the decision, whose outcome is o, in the metrics.
func (p *Policy) count(d *decision, o outcome) {
	if d.pinRejected {
		metrics.rejectedPins.Inc()
	}
	if d.skippedState {
		metrics.drainSkip.Inc()
	}
	if d.skippedLoad && d.chosen >= 0 {
		metrics.overloadSkip.Inc()
	}
	metrics.byOutcome[o].Inc()
}
