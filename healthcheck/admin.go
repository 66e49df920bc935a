package healthcheck

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// Admin API paths.
const (
	upstreamsPath = "/affinity/upstreams"
	statePath     = "/affinity/upstreams/state"
)

// maxStateBody bounds the body of a state change request.
const maxStateBody = 64 << 10

// AdminAPI is the admin API module `admin.api.affinity`. It serves:
//
//	GET  /affinity/upstreams        every known upstream and its state
//	POST /affinity/upstreams/state  {"upstream":"<dial>","state":"up"|"draining"|"maintenance"}
//
// A state set here applies to every affinity policy in the process that
// dials the upstream, and is written to Caddy's storage, from which every
// instance sharing that storage applies it within a few seconds (see
// AcquireSyncer). Errors are JSON: {"error":"..."}.
//
// The status page (GET /affinity/) and the session lookup (GET
// /affinity/lookup) sit next to these but are served by package affinity
// (admin.api.affinity_status, admin.api.affinity_lookup): they need the
// ring and the session table, and this package cannot import that one.
type AdminAPI struct {
	reg *registry // nil: the process-wide registry
}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.affinity",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// Routes returns the routes of the affinity admin endpoints.
func (a AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: upstreamsPath, Handler: caddy.AdminHandlerFunc(a.handleUpstreams)},
		{Pattern: statePath, Handler: caddy.AdminHandlerFunc(a.handleState)},
	}
}

func (a AdminAPI) registry() *registry {
	if a.reg != nil {
		return a.reg
	}
	return defaultRegistry
}

// UpstreamStatus is one upstream as the admin API shows it.
type UpstreamStatus struct {
	// Upstream is the dial address.
	Upstream string `json:"upstream"`
	// State is the lifecycle state: up, draining or maintenance.
	State State `json:"state"`
	// SetBy says who put the upstream in its state: "operator" (the
	// admin API, here or on an instance sharing storage), "probe" (the
	// drain probe), or empty (never changed, or set by code).
	SetBy string `json:"set_by,omitempty"`
	// Healthy is Caddy's health verdict as last reported by the policy
	// (true until the policy has reported one).
	Healthy bool `json:"healthy"`
	// Sessions is the number of live sessions pinned to the upstream, as
	// of the session table's last sweep.
	Sessions int64 `json:"sessions"`
	// Requests is the number of requests the affinity policy sent to it
	// since the process started.
	Requests uint64 `json:"requests"`
	// Drained is true when the upstream is draining and has no live
	// session left: it can be taken down without cutting a session.
	Drained bool `json:"drained"`
	// Since is when the state last changed (RFC 3339, UTC), or null if
	// it never did.
	Since *string `json:"since"`
}

// Status returns the upstream as the admin API shows it.
func (u *Upstream) Status() UpstreamStatus {
	st := u.State()
	s := UpstreamStatus{
		Upstream: u.Dial,
		State:    st,
		SetBy:    u.setter().String(),
		Healthy:  u.Healthy(),
		Sessions: u.Sessions(),
		Requests: u.Requests(),
	}
	s.Drained = st == Draining && s.Sessions == 0
	if t := u.Since(); !t.IsZero() {
		v := t.UTC().Format(time.RFC3339)
		s.Since = &v
	}
	return s
}

// handleUpstreams serves GET /affinity/upstreams.
func (a AdminAPI) handleUpstreams(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return methodNotAllowed(w, r, http.MethodGet)
	}
	if a.reg == nil {
		discover()
	}
	all := a.registry().all()
	out := make([]UpstreamStatus, 0, len(all))
	for _, u := range all {
		out = append(out, u.Status())
	}
	return writeJSON(w, http.StatusOK, out)
}

// stateRequest is the body of POST /affinity/upstreams/state.
type stateRequest struct {
	Upstream string `json:"upstream"`
	State    string `json:"state"`
}

// handleState serves POST /affinity/upstreams/state.
func (a AdminAPI) handleState(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		return methodNotAllowed(w, r, http.MethodPost)
	}
	if a.reg == nil {
		discover()
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxStateBody))
	dec.DisallowUnknownFields()
	var req stateRequest
	if err := dec.Decode(&req); err != nil {
		if errors.Is(err, io.EOF) {
			return badRequest(`empty body: want {"upstream":"<dial address>","state":"up|draining|maintenance"}`)
		}
		return badRequest("invalid JSON body: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return badRequest("invalid JSON body: unexpected data after the object")
	}
	switch {
	case req.Upstream == "" && req.State == "":
		return badRequest(`missing fields "upstream" and "state"`)
	case req.Upstream == "":
		return badRequest(`missing field "upstream": the dial address, as listed by GET %s`, upstreamsPath)
	case req.State == "":
		return badRequest(`missing field "state": want up, draining or maintenance`)
	}
	st, err := ParseState(req.State)
	if err != nil {
		return badRequest("%v", err)
	}
	reg := a.registry()
	u := reg.lookup(req.Upstream)
	if u == nil {
		return caddy.APIError{
			HTTPStatus: http.StatusNotFound,
			Err: fmt.Errorf("unknown upstream %q: no affinity policy in this process has used it (GET %s lists the known ones)",
				req.Upstream, upstreamsPath),
		}
	}
	rec := reg.operate(u, st)
	if s := reg.currentSyncer(); s != nil {
		ctx, cancel := context.WithTimeout(r.Context(), syncTimeout)
		defer cancel()
		if err := s.write(ctx, u.Dial, rec); err != nil {
			return caddy.APIError{
				HTTPStatus: http.StatusInternalServerError,
				Err: fmt.Errorf("%s is now %s on this instance, but writing it to storage failed (retried every %s, other instances follow once it succeeds): %v",
					u.Dial, st, SyncInterval, err),
			}
		}
	}
	// With no syncer yet, the state is written when one starts.
	return writeJSON(w, http.StatusOK, u.Status())
}

// writeJSON writes v as the JSON response.
func writeJSON(w http.ResponseWriter, status int, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
	return nil
}

// badRequest returns a 400 error; Caddy's admin server writes it as
// {"error":"<message>"}.
func badRequest(format string, args ...any) error {
	return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf(format, args...)}
}

// methodNotAllowed returns a 405 error and sets the Allow header.
func methodNotAllowed(w http.ResponseWriter, r *http.Request, allow string) error {
	w.Header().Set("Allow", allow)
	return caddy.APIError{
		HTTPStatus: http.StatusMethodNotAllowed,
		Err:        fmt.Errorf("method %s not allowed on %s: use %s", r.Method, r.URL.Path, allow),
	}
}

// Interface guards
var _ caddy.AdminRouter = AdminAPI{}
