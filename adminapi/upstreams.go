package adminapi

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/caddy-affinity/caddy-affinity/affinity"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// maxStateBody bounds the body of a state change request.
const maxStateBody = 64 << 10

// UpstreamStatus is one upstream as GET /affinity/upstreams lists it.
type UpstreamStatus struct {
	// Upstream is the dial address.
	Upstream string `json:"upstream"`
	// State is the lifecycle state (healthcheck.States): up, draining or
	// maintenance.
	State healthcheck.State `json:"state"`
	// SetBy says who put the upstream in its state: "operator" (the
	// admin API, here or on an instance sharing storage), "probe" (the
	// drain probe), or empty (never changed).
	SetBy string `json:"set_by,omitempty"`
	// LastOrder is the last state an operator set for the upstream
	// (through this instance's admin API, or one sharing its Caddy
	// storage or its store redis): which state, which instance took it
	// and when. Absent when no operator ever set one.
	LastOrder *OrderStatus `json:"last_order,omitempty"`
	// Healthy is Caddy's health verdict (active and passive checks), read
	// when the answer is made.
	Healthy bool `json:"healthy"`
	// Sessions is the number of live sessions pinned to the upstream,
	// exact when the answer is made.
	Sessions int64 `json:"sessions"`
	// Requests is the number of requests the affinity policy sent to it
	// since the process started.
	Requests uint64 `json:"requests"`
	// Drained is true when the upstream is in a state that drains
	// (draining) and has no live session left: it can be taken down
	// without cutting a session.
	Drained bool `json:"drained"`
	// Since is when the state last changed (RFC 3339, UTC), or null if
	// it never did.
	Since *string `json:"since"`
	// Configured is false for an upstream no proxy of the running config
	// uses (a reload dropped it, or a dynamic upstream the proxy no
	// longer resolves to): it is still known, with its state and
	// sessions, until it is forgotten (10 minutes after its last use, and
	// not while it has live sessions). GET /affinity/upstreams lists them
	// only with ?all=1.
	Configured bool `json:"configured"`
	// LastUsed is, for an upstream that is not configured, when a config
	// last used it (RFC 3339, UTC); it is forgotten 10 minutes later
	// unless it has live sessions.
	LastUsed *string `json:"last_used,omitempty"`
}

// OrderStatus is an operator's last order, as the admin API shows it.
type OrderStatus struct {
	// State is the state the operator asked for.
	State healthcheck.State `json:"state"`
	// By names the instance whose admin API took it: host name / Caddy
	// instance ID.
	By string `json:"by"`
	// At is when (RFC 3339 with milliseconds, UTC).
	At string `json:"at"`
}

// statusOf returns the upstream as the admin API shows it.
func statusOf(u *healthcheck.Upstream) UpstreamStatus {
	st := u.State()
	s := UpstreamStatus{
		Upstream: u.Dial,
		State:    st,
		SetBy:    u.SetBy(),
		Healthy:  u.Healthy(),
		Sessions: affinity.LiveSessions(u.ID),
		Requests: u.Requests(),
	}
	info, _ := st.Info()
	// Under store redis, drained only once the cluster's count says so.
	s.Drained = info.Drains() && s.Sessions == 0 && affinity.ClusterCountKnown(u.ID)
	if o, ok := u.LastOrder(); ok {
		s.LastOrder = &OrderStatus{State: o.State, By: o.By, At: o.Since.UTC().Format("2006-01-02T15:04:05.000Z07:00")}
	}
	if t := u.Since(); !t.IsZero() {
		v := t.UTC().Format(time.RFC3339)
		s.Since = &v
	}
	s.Configured = u.Configured()
	if !s.Configured {
		v := u.LastUsed().UTC().Format(time.RFC3339)
		s.LastUsed = &v
	}
	return s
}

// handleUpstreams serves GET /affinity/upstreams: the upstreams of the
// running config, or with ?all=1 every upstream still known (those no
// longer configured marked "configured": false).
func handleUpstreams(w http.ResponseWriter, r *http.Request) error {
	if err := allowOnly(w, r, http.MethodGet); err != nil {
		return err
	}
	all, err := wantAll(r)
	if err != nil {
		return err
	}
	affinity.Refresh()
	known := healthcheck.All()
	out := make([]UpstreamStatus, 0, len(known))
	for _, u := range known {
		if s := statusOf(u); s.Configured || all {
			out = append(out, s)
		}
	}
	return writeJSON(w, http.StatusOK, out)
}

// wantAll reads the query parameter all: absent, 0/false or 1/true.
func wantAll(r *http.Request) (bool, error) {
	v := r.URL.Query().Get("all")
	if v == "" {
		return false, nil
	}
	all, err := strconv.ParseBool(v)
	if err != nil {
		return false, apiError(http.StatusBadRequest, "all=%q: want 1 (every known upstream, configured or not) or 0", v)
	}
	return all, nil
}

// stateRequest is the body of POST /affinity/upstreams/state.
type stateRequest struct {
	Upstream string `json:"upstream"`
	State    string `json:"state"`
}

// handleState serves POST /affinity/upstreams/state.
func handleState(w http.ResponseWriter, r *http.Request) error {
	if err := allowOnly(w, r, http.MethodPost); err != nil {
		return err
	}
	req, err := decodeStateRequest(w, r)
	if err != nil {
		return err
	}
	st, err := healthcheck.ParseState(req.State)
	if err != nil {
		return apiError(http.StatusBadRequest, "%v", err)
	}
	affinity.Refresh() // so that an upstream can be drained before its first request
	u, err := healthcheck.Operate(r.Context(), req.Upstream, st)
	switch {
	case errors.Is(err, healthcheck.ErrUnknownUpstream):
		return apiError(http.StatusNotFound, "%v (GET %s lists the known ones)", err, UpstreamsPath)
	case err != nil:
		return apiError(http.StatusInternalServerError, "%v", err)
	}
	return writeJSON(w, http.StatusOK, statusOf(u))
}

// decodeStateRequest reads and checks the body of a state change.
func decodeStateRequest(w http.ResponseWriter, r *http.Request) (stateRequest, error) {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxStateBody))
	dec.DisallowUnknownFields()
	var req stateRequest
	if err := dec.Decode(&req); err != nil {
		if errors.Is(err, io.EOF) {
			return req, apiError(http.StatusBadRequest, `empty body: want {"upstream":"<dial address>","state":"%s"}`, healthcheck.StateNames("|", "|"))
		}
		return req, apiError(http.StatusBadRequest, "invalid JSON body: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return req, apiError(http.StatusBadRequest, "invalid JSON body: unexpected data after the object")
	}
	switch {
	case req.Upstream == "" && req.State == "":
		return req, apiError(http.StatusBadRequest, `missing fields "upstream" and "state"`)
	case req.Upstream == "":
		return req, apiError(http.StatusBadRequest, `missing field "upstream": the dial address, as listed by GET %s`, UpstreamsPath)
	case req.State == "":
		return req, apiError(http.StatusBadRequest, `missing field "state": want %s`, healthcheck.StateNames(", ", " or "))
	}
	return req, nil
}
