package hashring

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/cespare/xxhash/v2"
)

var benchSizes = []int{3, 16, 64, 1000}

// benchKeys returns 1024 distinct 32-byte keys, like session cookie values.
func benchKeys() []string {
	rng := rand.New(rand.NewPCG(9, 9))
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = fmt.Sprintf("%016x%016x", rng.Uint64(), rng.Uint64())
	}
	return keys
}

var sink int

// BenchmarkLookup measures what a request pays to find its member:
// hashing a 32-byte key and one table lookup.
func BenchmarkLookup(b *testing.B) {
	keys := benchKeys()
	for _, n := range benchSizes {
		r := mustNew(b, upstreams(n))
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			i := 0
			for b.Loop() {
				sink += r.Lookup(HashString(keys[i%len(keys)]))
				i++
			}
		})
	}
}

// BenchmarkWalkSkipOne measures failover: the owner is unusable, so the
// caller takes the next member of the probe order.
func BenchmarkWalkSkipOne(b *testing.B) {
	keys := benchKeys()
	for _, n := range benchSizes {
		r := mustNew(b, upstreams(n))
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			i := 0
			for b.Loop() {
				skipped := false
				r.Walk(HashString(keys[i%len(keys)]), func(m int) bool {
					if !skipped {
						skipped = true // the owner is down
						return true
					}
					sink += m
					return false
				})
				i++
			}
		})
	}
}

// BenchmarkRendezvous is the yardstick: Caddy's own hostByHashing
// (modules/caddyhttp/reverseproxy/selectionpolicies.go, v2.11.9), which
// hashes every available upstream's address with the key and takes the
// highest, on the same keys and pool sizes.
func BenchmarkRendezvous(b *testing.B) {
	keys := benchKeys()
	for _, n := range benchSizes {
		pool := make([]*rvUpstream, n)
		for i, m := range upstreams(n) {
			pool[i] = &rvUpstream{Dial: m.Name, healthy: true}
		}
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			i := 0
			for b.Loop() {
				if up := hostByHashing(pool, keys[i%len(keys)]); up != nil {
					sink++
				}
				i++
			}
		})
	}
}

// rvUpstream stands in for reverseproxy.Upstream: String returns the dial
// address and Available a health flag, as far as hostByHashing cares.
type rvUpstream struct {
	Dial    string
	healthy bool
}

func (u *rvUpstream) String() string  { return u.Dial }
func (u *rvUpstream) Available() bool { return u.healthy }

// hostByHashing is copied from Caddy v2.11.9.
func hostByHashing(pool []*rvUpstream, s string) *rvUpstream {
	var highestHash uint64
	var upstream *rvUpstream
	for _, up := range pool {
		if !up.Available() {
			continue
		}
		h := hash(up.String() + s) // important to hash key and server together
		if h > highestHash {
			highestHash = h
			upstream = up
		}
	}
	return upstream
}

// hash is copied from Caddy v2.11.9.
func hash(s string) uint64 {
	h := xxhash.New()
	_, _ = h.Write([]byte(s))
	return h.Sum64()
}

// BenchmarkBuild measures New, paid on every change of the member set.
func BenchmarkBuild(b *testing.B) {
	for _, n := range benchSizes {
		ms := upstreams(n)
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			for b.Loop() {
				if _, err := New(ms); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkBuildWeighted measures New with unequal weights (1 to 7),
// which fill in several classes of members.
func BenchmarkBuildWeighted(b *testing.B) {
	for _, n := range []int{64, 1000} {
		ms := upstreams(n)
		for i := range ms {
			ms[i].Weight = 1 + i%7
		}
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			for b.Loop() {
				if _, err := New(ms); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
