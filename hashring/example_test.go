package hashring_test

import (
	"fmt"

	"github.com/caddy-affinity/caddy-affinity/hashring"
)

func Example() {
	upstreams := []hashring.Member{
		{Name: "10.0.0.1:8080", Weight: 1},
		{Name: "10.0.0.2:8080", Weight: 1},
		{Name: "10.0.0.3:8080", Weight: 2}, // twice the share of keys
	}
	ring, err := hashring.New(upstreams)
	if err != nil {
		panic(err)
	}

	// Every process given these members sends a session to the same place.
	key := hashring.HashStringSeed("session-4b1d", 1)
	owner := ring.Lookup(key)
	fmt.Println("owner:", upstreams[owner].Name)

	// If the owner is down, take the next member in the key's probe order.
	// Only the down member's keys move, and they come back when it does.
	healthy := func(i int) bool { return i != owner }
	ring.Walk(key, func(i int) bool {
		if !healthy(i) {
			return true // keep walking
		}
		fmt.Println("failover:", upstreams[i].Name)
		return false
	})

	// Listing the same members in another order moves no key.
	reordered := []hashring.Member{upstreams[2], upstreams[0], upstreams[1]}
	ring, _ = hashring.New(reordered)
	fmt.Println("owner:", reordered[ring.Lookup(key)].Name)
	// Output:
	// owner: 10.0.0.1:8080
	// failover: 10.0.0.2:8080
	// owner: 10.0.0.1:8080
}
