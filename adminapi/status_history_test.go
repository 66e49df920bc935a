package adminapi

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// The status JSON carries the chart's history (null before any policy is
// provisioned; tests/browser_test.go checks it filled through the real
// binary), and the page has the chart's place, drawn by its script.
func TestStatusHasHistory(t *testing.T) {
	w := httptest.NewRecorder()
	if err := handleStatus(w, httptest.NewRequest(http.MethodGet, StatusPath, nil)); err != nil {
		t.Fatal(err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(w.Body.Bytes(), &fields); err != nil {
		t.Fatal(err)
	}
	if h, ok := fields["history"]; !ok || string(h) != "null" {
		t.Errorf("history %s (present: %v), want null without a policy", h, ok)
	}
	var b strings.Builder
	if err := statusPage.Execute(&b, statusResponse{Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`<svg id="chart"`, `<ul id="chart-legend">`, `renderChart(st)`} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("page lacks %s", want)
		}
	}
}
