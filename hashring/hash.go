package hashring

import "github.com/zeebo/xxh3"

// Hashes have no per-process seed, so a key hashes the same everywhere,
// which is what keeps the mapping identical across processes and
// machines.

// HashSeed returns the xxh3 hash of b with the given seed. Callers that
// draw keys from several sources (cookie, header, client address) can use
// one seed per source so that equal strings from different sources land
// on unrelated members.
func HashSeed(b []byte, seed uint64) uint64 {
	return xxh3.HashSeed(b, seed)
}

// HashStringSeed returns HashSeed([]byte(s), seed) without converting s.
func HashStringSeed(s string, seed uint64) uint64 {
	return xxh3.HashStringSeed(s, seed)
}
