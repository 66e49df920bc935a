package adminapi

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(StatusHandler{})
	httpcaddyfile.RegisterHandlerDirective("affinity_status", parseStatusHandler)
	// Where Caddy's own `metrics` handler goes: a terminal handler that
	// answers what its matcher gives it, after auth (basic_auth,
	// forward_auth) and before reverse_proxy.
	httpcaddyfile.RegisterDirectiveOrder("affinity_status", httpcaddyfile.After, "metrics")
}

// StatusHandler is the HTTP handler `http.handlers.affinity_status`: the
// status page and the affinity endpoints of the admin API, served on a
// site route, so that the page can sit behind basic_auth or
// forward_auth and be reached without the admin listener. Like Caddy's
// `metrics` handler it answers every request its route gives it; the
// endpoint is the end of the request's path:
//
//	.../                  the status page (HTML for browsers, JSON otherwise)
//	.../upstreams         every upstream, its state, health and sessions
//	.../upstreams/state   POST: set a state (same origin only)
//	.../lookup?key=...    where a session goes now, and why
//
// A path that is none of these and does not end in "/" is redirected to
// the page (path + "/"), which the page's relative links need. A state
// change must be a POST that a browser did not make from another site:
// an Origin naming another host, or a Sec-Fetch-Site other than
// same-origin, is refused with 403. Errors are JSON, {"error":"..."}, as
// on the admin API.
type StatusHandler struct{}

// CaddyModule returns the Caddy module information.
func (StatusHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.affinity_status",
		New: func() caddy.Module { return new(StatusHandler) },
	}
}

// statusEndpoints map a path's end to its admin path and handler, the
// longer ends first.
var statusEndpoints = []struct {
	suffix, path string
	handle       func(http.ResponseWriter, *http.Request) error
}{
	{"/upstreams/state", StatePath, handleState},
	{"/upstreams", UpstreamsPath, handleUpstreams},
	{"/lookup", LookupPath, handleLookup},
	{"/", StatusPath, handleStatus},
}

// ServeHTTP serves the endpoint the path ends in; it never calls next.
func (StatusHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	for _, e := range statusEndpoints {
		if !strings.HasSuffix(r.URL.Path, e.suffix) {
			continue
		}
		if e.path == StatePath && r.Method == http.MethodPost {
			if err := sameOrigin(r); err != nil {
				writeAPIError(w, err)
				return nil
			}
		}
		// The admin handlers know their endpoint by its admin path.
		r2 := r.Clone(r.Context())
		r2.URL.Path, r2.URL.RawPath = e.path, ""
		writeAPIError(w, e.handle(w, r2))
		return nil
	}
	target := url.URL{Path: r.URL.Path + "/", RawQuery: r.URL.RawQuery}
	http.Redirect(w, r, target.String(), http.StatusPermanentRedirect)
	return nil
}

// sameOrigin refuses a state change a browser made for another site's
// page. Browsers send Origin with every POST a script or form makes, and
// Sec-Fetch-Site; curl and scripts send neither, and pass (they passed
// the route's authentication).
func sameOrigin(r *http.Request) error {
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" && site != "none" {
		return apiError(http.StatusForbidden, "refused: a state change from another site (Sec-Fetch-Site: %s); use the status page of this site, or curl", site)
	}
	origin := r.Header.Get("Origin")
	if origin == "" {
		return nil
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" || !strings.EqualFold(u.Host, r.Host) {
		return apiError(http.StatusForbidden, "refused: a state change from origin %q, not this site (%s)", origin, r.Host)
	}
	return nil
}

// writeAPIError writes err as the admin API does: {"error":"..."} with
// the error's status (500 if it has none). It does nothing for nil.
func writeAPIError(w http.ResponseWriter, err error) {
	if err == nil {
		return
	}
	var apiErr caddy.APIError
	if !errors.As(err, &apiErr) {
		apiErr = caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	if apiErr.HTTPStatus == 0 {
		apiErr.HTTPStatus = http.StatusInternalServerError
	}
	if apiErr.Message == "" && apiErr.Err != nil {
		apiErr.Message = apiErr.Err.Error()
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(apiErr.HTTPStatus)
	_ = json.NewEncoder(w).Encode(apiErr)
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens:
//
//	affinity_status
//
// It takes no arguments (beyond a matcher, like any handler directive).
func (h *StatusHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
	if d.NextArg() {
		return d.Errf("affinity_status takes no arguments (got %q): put it under a matcher or a handle block, e.g. handle /affinity/* { basic_auth { ... } affinity_status }", d.Val())
	}
	if d.NextBlock(0) {
		return d.Errf("affinity_status takes no options (got %q)", d.Val())
	}
	return nil
}

// parseStatusHandler is the Caddyfile's affinity_status directive.
func parseStatusHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var s StatusHandler
	err := s.UnmarshalCaddyfile(h.Dispenser)
	return s, err
}

// Interface guards
var (
	_ caddyhttp.MiddlewareHandler = StatusHandler{}
	_ caddyfile.Unmarshaler       = (*StatusHandler)(nil)
)
