// Package adminapi is caddy-affinity's admin API and status page, on
// Caddy's admin listener (module admin.api.affinity):
//
//	GET  /affinity/                 the status page (HTML for browsers, JSON otherwise)
//	GET  /affinity/upstreams        every upstream, its state, health and live sessions
//	POST /affinity/upstreams/state  {"upstream":"<dial>","state":"up"|"draining"|"maintenance"}
//	GET  /affinity/lookup?key=...   where a session goes now, and why
//
// It owns the HTTP side only: what an upstream may do is package
// healthcheck's, sessions, placement and their explanation are package
// affinity's; this package imports both and puts them together. Errors
// are JSON, {"error":"..."}, as Caddy's admin server writes them.
package adminapi

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(API{})
}

// The API's paths; the `caddy affinity` command uses them too.
const (
	StatusPath    = "/affinity/"
	UpstreamsPath = "/affinity/upstreams"
	StatePath     = "/affinity/upstreams/state"
	LookupPath    = "/affinity/lookup"
)

// API is the admin API module `admin.api.affinity`. Caddy builds admin
// routers before it provisions any app, so every handler reads the
// running config when it is called (affinity.Refresh), never before.
type API struct{}

// CaddyModule returns the Caddy module information.
func (API) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.affinity",
		New: func() caddy.Module { return new(API) },
	}
}

// Routes returns the routes of the affinity endpoints. As a ServeMux
// pattern the status page is a subtree: the more specific paths still go
// to their own handlers.
func (API) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: StatusPath, Handler: caddy.AdminHandlerFunc(handleStatus)},
		{Pattern: UpstreamsPath, Handler: caddy.AdminHandlerFunc(handleUpstreams)},
		{Pattern: StatePath, Handler: caddy.AdminHandlerFunc(handleState)},
		{Pattern: LookupPath, Handler: caddy.AdminHandlerFunc(handleLookup)},
	}
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

// apiError returns an error Caddy's admin server writes as
// {"error":"<message>"} with the given status.
func apiError(status int, format string, args ...any) error {
	return caddy.APIError{HTTPStatus: status, Err: fmt.Errorf(format, args...)}
}

// allowOnly returns nil for an allowed method, else a 405 with Allow.
func allowOnly(w http.ResponseWriter, r *http.Request, methods ...string) error {
	for _, m := range methods {
		if r.Method == m {
			return nil
		}
	}
	w.Header().Set("Allow", strings.Join(methods, ", "))
	return apiError(http.StatusMethodNotAllowed, "method %s not allowed on %s: use %s", r.Method, r.URL.Path, methods[0])
}

// Interface guards
var _ caddy.AdminRouter = API{}
