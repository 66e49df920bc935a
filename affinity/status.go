package affinity

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"html/template"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

func init() {
	caddy.RegisterModule(StatusAPI{})
}

// statusPath is the status page on the admin listener. As a ServeMux
// pattern it is a subtree: the more specific /affinity/upstreams and
// /affinity/lookup still go to their own handlers.
const statusPath = "/affinity/"

// StatusAPI is the admin API module `admin.api.affinity_status`:
//
//	GET /affinity/   an HTML status page for Accept: text/html (browsers),
//	                 JSON otherwise
//
// The page lists every upstream with its state, health, live sessions,
// share of the ring, requests and recent failovers, with buttons that
// POST to /affinity/upstreams/state, and refreshes itself every 2 s. It
// is one server-rendered template with a little inline script: nothing
// to build, nothing fetched from elsewhere.
//
// The JSON is /affinity/upstreams' list, each entry with its ring share,
// plus the policies found in the running config and the failover log.
type StatusAPI struct{}

// CaddyModule returns the Caddy module information.
func (StatusAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.affinity_status",
		New: func() caddy.Module { return new(StatusAPI) },
	}
}

// Routes returns the status route.
func (StatusAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: statusPath, Handler: caddy.AdminHandlerFunc(handleStatus)}}
}

// statusResponse is the status page's data, and its JSON.
type statusResponse struct {
	// Time is when the status was taken.
	Time time.Time `json:"time"`
	// Upstreams is every upstream known to the process, sorted by dial
	// address, as GET /affinity/upstreams lists them plus their share.
	Upstreams []upstreamRow `json:"upstreams"`
	// Policies is every reverse_proxy using lb_policy affinity.
	Policies []policyInfo `json:"policies"`
	// Failovers are the most recent failover events, newest first;
	// FailoversTotal counts every failover since the process started.
	Failovers      []failoverEvent `json:"failovers"`
	FailoversTotal uint64          `json:"failovers_total"`
	// SessionTable is the process-wide session table; null before any
	// policy is provisioned.
	SessionTable *tableStatus `json:"session_table"`
}

// upstreamRow is one upstream on the status page.
type upstreamRow struct {
	healthcheck.UpstreamStatus
	// Share is the fraction of the ring (and so of new sessions' keys)
	// the upstream owns, in the first policy that lists it; null if no
	// policy of the running config does. Keys of an upstream that may
	// not take new sessions walk on to the next ones.
	Share *float64 `json:"share"`
	// Configured is false for an upstream that a policy used before but
	// none of the running config does (the registry keeps its state in
	// case it comes back).
	Configured bool `json:"configured"`
}

// policyInfo describes one policy of the running config.
type policyInfo struct {
	policyRef
	// Keys are the session keys, in order, as the Caddyfile writes them.
	Keys []string `json:"keys"`
	// PinCookie is the pin cookie's name, or "off".
	PinCookie  string `json:"pin_cookie"`
	SessionTTL string `json:"session_ttl"`
	Hold       string `json:"hold,omitempty"`
	SlowStart  string `json:"slow_start,omitempty"`
	// Upstreams are the policy's upstreams in config order, with their
	// weights and ring shares.
	Upstreams []policyUpstream `json:"upstreams"`
	// Error is set when the policy's ring cannot be shown.
	Error string `json:"error,omitempty"`
}

// policyUpstream is one upstream of one policy.
type policyUpstream struct {
	Upstream string  `json:"upstream"`
	Weight   int     `json:"weight"`
	Share    float64 `json:"share"`
}

// tableStatus is the session table's size.
type tableStatus struct {
	Entries   int    `json:"entries"`
	Evictions uint64 `json:"evictions"`
}

// collectStatus takes the status now.
func collectStatus(now time.Time) statusResponse {
	// What the admin API's /affinity/upstreams does first: registers the
	// running config's upstreams and copies Caddy's health verdicts.
	watchFarm()
	st := statusResponse{Time: now.UTC(), Upstreams: []upstreamRow{}, Policies: []policyInfo{}}
	shares := make(map[string]float64)
	eachPolicy(func(s policySite) {
		info := describePolicy(s)
		for _, u := range info.Upstreams {
			if _, seen := shares[u.Upstream]; !seen {
				shares[u.Upstream] = u.Share
			}
		}
		st.Policies = append(st.Policies, info)
	})
	for _, u := range healthcheck.All() {
		row := upstreamRow{UpstreamStatus: u.Status()}
		if share, ok := shares[u.Dial]; ok {
			row.Share, row.Configured = &share, true
		}
		st.Upstreams = append(st.Upstreams, row)
	}
	st.Failovers, st.FailoversTotal = failovers.snapshot()
	if t := currentTable(); t != nil {
		st.SessionTable = &tableStatus{Entries: t.len(), Evictions: t.evicted()}
	}
	return st
}

// describePolicy returns what the status page shows of one policy.
func describePolicy(s policySite) policyInfo {
	p := s.Policy
	info := policyInfo{
		policyRef:  refOf(s),
		Keys:       make([]string, 0, len(p.Keys)),
		PinCookie:  p.PinCookie,
		SessionTTL: time.Duration(p.SessionTTL).String(),
		Upstreams:  []policyUpstream{},
	}
	if p.DisablePinCookie {
		info.PinCookie = "off"
	}
	if p.Hold > 0 {
		info.Hold = time.Duration(p.Hold).String()
	}
	if p.SlowStart > 0 {
		info.SlowStart = time.Duration(p.SlowStart).String()
	}
	for i := range p.Keys {
		info.Keys = append(info.Keys, describeKey(&p.Keys[i]))
	}
	ps, err := poolFor(s)
	if err != nil {
		info.Error = err.Error()
		return info
	}
	for i, u := range ps.ups {
		weight := 1
		if i < len(p.Weights) {
			weight = p.Weights[i]
		}
		info.Upstreams = append(info.Upstreams, policyUpstream{Upstream: u.Dial, Weight: weight, Share: ps.ring.Share(i)})
	}
	return info
}

//go:embed status.html
var statusHTML string

// statusPage is the page's template. Every value is escaped by
// html/template; the script builds rows with textContent.
var statusPage = template.Must(template.New("status").Funcs(template.FuncMap{
	"pct": func(f *float64) string {
		if f == nil {
			return "–"
		}
		return fmt.Sprintf("%.1f%%", 100**f)
	},
	"share": func(f float64) string { return fmt.Sprintf("%.1f%%", 100*f) },
	"when":  func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05Z") },
	"since": func(s *string) string {
		if s == nil {
			return "–"
		}
		return *s
	},
}).Parse(statusHTML))

// handleStatus serves GET /affinity/.
func handleStatus(w http.ResponseWriter, r *http.Request) error {
	if r.URL.Path != statusPath {
		return apiError(http.StatusNotFound, "no affinity endpoint %s: see %s, %s, %s and %s",
			r.URL.Path, statusPath, "/affinity/upstreams", "/affinity/upstreams/state", lookupPath)
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return apiError(http.StatusMethodNotAllowed, "method %s not allowed on %s: use GET", r.Method, statusPath)
	}
	st := collectStatus(time.Now())
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Add("Vary", "Accept")
	if !wantsHTML(r) {
		return writeJSON(w, http.StatusOK, st)
	}
	var buf strings.Builder
	if err := statusPage.Execute(&buf, st); err != nil {
		return apiError(http.StatusInternalServerError, "rendering the status page: %v", err)
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	// The page's script only talks to this listener; nothing else may be
	// loaded or framed.
	w.Header().Set("Content-Security-Policy",
		"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write([]byte(buf.String()))
	}
	return nil
}

// wantsHTML reports whether the client asked for HTML (a browser) rather
// than JSON (scripts, the page's own refresh).
func wantsHTML(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept") {
		if strings.Contains(v, "text/html") {
			return true
		}
	}
	return false
}

// writeJSON writes v as the JSON response.
func writeJSON(w http.ResponseWriter, status int, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return apiError(http.StatusInternalServerError, "%v", err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
	return nil
}

// Interface guards
var _ caddy.AdminRouter = StatusAPI{}
