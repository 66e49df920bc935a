package affinity

import (
	"fmt"
	"testing"
	"time"
)

func TestFailoverLogCoalescesAndWraps(t *testing.T) {
	var l failoverLog
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	// A burst from A to B and C, interleaved, is two events.
	for i := range 10 {
		to := "B"
		if i%2 == 1 {
			to = "C"
		}
		l.recordAt("A", to, "upstream unhealthy", t0.Add(time.Duration(i)*time.Second))
	}
	es, total := l.snapshot()
	if total != 10 || len(es) != 2 {
		t.Fatalf("burst: total %d, events %+v", total, es)
	}
	if es[0].To != "C" || es[0].Count != 5 || es[1].To != "B" || es[1].Count != 5 || !es[1].First.Equal(t0) {
		t.Fatalf("burst events: %+v", es)
	}
	// The same failover after a quiet spell is a new event.
	l.recordAt("A", "B", "upstream unhealthy", t0.Add(time.Minute))
	if es, _ := l.snapshot(); len(es) != 3 || es[0].Count != 1 {
		t.Fatalf("after a quiet spell: %+v", es)
	}
	// The log keeps the last failoverLogSize events, newest first.
	for i := range failoverLogSize + 7 {
		l.recordAt(fmt.Sprint("u", i), "B", "r", t0.Add(time.Hour+time.Duration(i)*time.Minute))
	}
	es, total = l.snapshot()
	if len(es) != failoverLogSize || total != 11+failoverLogSize+7 {
		t.Fatalf("wrapped: %d events, total %d", len(es), total)
	}
	if es[0].From != fmt.Sprint("u", failoverLogSize+6) || es[len(es)-1].From != "u7" {
		t.Fatalf("wrapped order: first %s, last %s", es[0].From, es[len(es)-1].From)
	}
}
