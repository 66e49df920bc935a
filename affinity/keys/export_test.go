package keys

import (
	"net/http"
	"testing"
)

// AddKind adds a kind of key source for the length of a test, as its one
// entry in kinds would: the external test shows that the policy, its
// Caddyfile, the lookup and the admin API's list take it from there.
func AddKind(t testing.TB, name string, seed uint64, read func(*http.Request) (string, bool), inject func(*http.Request, string) error) {
	saved := kinds
	t.Cleanup(func() { kinds = saved })
	kinds = append(saved[:len(saved):len(saved)], &kind{
		name: name, seed: seed,
		read:   func(_ *Source, r *http.Request) (string, bool) { return read(r) },
		inject: func(_ *Source, r *http.Request, v string) error { return inject(r, v) },
	})
}
