package adminapi

import (
	"net/http"
	"strings"
	"time"

	"github.com/caddy-affinity/caddy-affinity/affinity"
	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
)

// lookupResponse is the answer of GET /affinity/lookup:
//
//	GET /affinity/lookup?key=<value>[&source=<key source>|pin][&name=<name>]
//
// For every reverse_proxy of the running config that uses lb_policy
// affinity: where a request carrying that key (and no pin cookie) goes
// now, and why (affinity.Explain). It changes nothing a request would
// notice. source picks the policy's key of that kind (default: its first
// key) and name the one of that name; source=pin reads the value as a pin
// cookie. A query key's value is hashed as the client sends it, still
// percent-encoded, so percent-encode it once more here.
type lookupResponse struct {
	// Source and Name echo the request's parameters (the key value is
	// not echoed: it may be a live session id).
	Source string `json:"source,omitempty"`
	Name   string `json:"name,omitempty"`
	// Policies has one entry per reverse_proxy using lb_policy affinity,
	// in config order.
	Policies []affinity.Explanation `json:"policies"`
}

func handleLookup(w http.ResponseWriter, r *http.Request) error {
	if err := allowOnly(w, r, http.MethodGet); err != nil {
		return err
	}
	q := r.URL.Query()
	value, source, name := q.Get("key"), q.Get("source"), q.Get("name")
	sources, named := []string{}, map[string]bool{}
	for _, k := range keys.Kinds() {
		sources = append(sources, k.Name)
		named[k.Name] = k.Named
	}
	if value == "" {
		return apiError(http.StatusBadRequest,
			"missing key: GET %s?key=<value>[&source=%s|pin][&name=<cookie, header, query or path parameter name>]", LookupPath, strings.Join(sources, "|"))
	}
	if name != "" && source != "" && !named[source] {
		return apiError(http.StatusBadRequest, "source %s takes no name", source)
	}
	resp := lookupResponse{Source: source, Name: name, Policies: []affinity.Explanation{}}
	now := time.Now()
	for _, s := range affinity.Refresh() {
		resp.Policies = append(resp.Policies, affinity.Explain(s, source, name, value, now))
	}
	if len(resp.Policies) == 0 {
		return apiError(http.StatusNotFound, "no reverse_proxy in the running config uses lb_policy affinity")
	}
	return writeJSON(w, http.StatusOK, resp)
}
