// Package redisconn is how `store redis` reaches Redis: one server, a
// master watched by Sentinel, or a Redis Cluster. It owns the connection
// options (their JSON, their Caddyfile lines, their checks) and builds
// the one client type the store uses for all three, a
// redis.UniversalClient whose every call is bounded by the timeout and
// which follows a Sentinel or Cluster failover by itself.
//
// It knows nothing of sessions or key layouts: the store embeds Config in
// its own config and owns key_prefix and everything above the client.
package redisconn

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// DefaultTimeout bounds every Redis call when Timeout is not set: issue
// 15 measured 50ms breaking sessions under bursts on a busy 2-core
// machine and 500ms breaking none. The store may set its own default by
// filling Timeout before it calls Client.
const DefaultTimeout = 500 * time.Millisecond

// MaxTimeout is the largest Timeout accepted: a request never waits
// longer for Redis.
const MaxTimeout = 10 * time.Second

// Config is the connection of `store redis`: exactly one of Address,
// Sentinel (with SentinelMaster) or Cluster, and the options common to
// all three. Embedded without a JSON tag in the store's config, its
// fields sit beside the store's own (key_prefix):
//
//	{"address": "127.0.0.1:6379", "password": "{env.REDIS_PASSWORD}", "timeout": "500ms"}
//	{"sentinel_master": "mymaster", "sentinels": ["10.0.0.1:26379", "10.0.0.2:26379"], "sentinel_password": "..."}
//	{"cluster": ["10.0.0.1:6379", "10.0.0.2:6379"], "tls": true}
//
// Every string may hold placeholders such as {env.REDIS_PASSWORD},
// replaced when the client is built.
type Config struct {
	// Address is the host:port of a single Redis server.
	Address string `json:"address,omitempty"`

	// SentinelMaster is the name under which the sentinels monitor the
	// master (the `sentinel monitor <name> ...` of their config). With
	// Sentinels, the client asks the sentinels where the master is and
	// follows them when they promote a replica.
	SentinelMaster string `json:"sentinel_master,omitempty"`
	// Sentinels are host:port addresses of sentinels (their port, often
	// 26379, not the master's). One that answers is enough; list them
	// all.
	Sentinels []string `json:"sentinels,omitempty"`
	// SentinelPassword authenticates to the sentinels (their
	// requirepass), when they require it; Password is the master's.
	SentinelPassword string `json:"sentinel_password,omitempty"` //nolint:gosec // config field

	// Cluster are host:port addresses of nodes of a Redis Cluster, used
	// to discover the rest (any node, master or replica; list several,
	// in case one is down at start).
	Cluster []string `json:"cluster,omitempty"`

	// Username and Password authenticate to Redis (an ACL user, or the
	// password alone for requirepass).
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"` //nolint:gosec // config field
	// DB is the database number. Default 0. Redis Cluster has only 0.
	DB int `json:"db,omitempty"`
	// TLS connects over TLS (to the sentinels too), verifying the
	// server's certificate against the system's roots.
	TLS bool `json:"tls,omitempty"`
	// Timeout bounds each call to Redis in total: dialling, waiting for a
	// pooled connection, writing, reading, and following a Cluster's
	// redirects. Past it the caller goes on without Redis. Default 500ms,
	// at most 10s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
}

// Topology says which of the three ways to reach Redis a Config uses.
type Topology string

// The topologies.
const (
	Single   Topology = "single"
	Sentinel Topology = "sentinel"
	Cluster  Topology = "cluster"
)

// Topology returns the config's topology (Single when nothing is set:
// Validate says what is missing).
func (c *Config) Topology() Topology {
	switch {
	case len(c.Cluster) > 0:
		return Cluster
	case c.SentinelMaster != "" || len(c.Sentinels) > 0:
		return Sentinel
	}
	return Single
}

// CallTimeout returns the bound of one call: Timeout, or DefaultTimeout.
func (c *Config) CallTimeout() time.Duration { return c.timeout() }

// timeout returns the bound of one call.
func (c *Config) timeout() time.Duration {
	if c.Timeout == 0 {
		return DefaultTimeout
	}
	return time.Duration(c.Timeout)
}

// Validate checks the options, with errors that say how to fix them.
// The caller prefixes them with its directive ("store redis: ").
func (c *Config) Validate() error {
	given := 0
	for _, set := range []bool{c.Address != "", c.SentinelMaster != "" || len(c.Sentinels) > 0, len(c.Cluster) > 0} {
		if set {
			given++
		}
	}
	switch {
	case given == 0:
		return fmt.Errorf("need where Redis is: an address (store redis 127.0.0.1:6379), `sentinel <master_name> <sentinel_addr>...` or `cluster <node_addr>...`")
	case given > 1:
		return fmt.Errorf("give one of address (%q), sentinel (%q %q) or cluster (%q), not several", c.Address, c.SentinelMaster, c.Sentinels, c.Cluster)
	}
	switch c.Topology() {
	case Single:
		if err := checkAddr("address", c.Address); err != nil {
			return err
		}
	case Sentinel:
		if c.SentinelMaster == "" {
			return fmt.Errorf("sentinel: need the master's name as the sentinels know it (sentinel mymaster 10.0.0.1:26379)")
		}
		if len(c.Sentinels) == 0 {
			return fmt.Errorf("sentinel %s: need at least one sentinel's host:port (sentinel %s 10.0.0.1:26379)", c.SentinelMaster, c.SentinelMaster)
		}
		for _, a := range c.Sentinels {
			if err := checkAddr("sentinel", a); err != nil {
				return err
			}
		}
	case Cluster:
		for _, a := range c.Cluster {
			if err := checkAddr("cluster", a); err != nil {
				return err
			}
		}
		if c.DB != 0 {
			return fmt.Errorf("db %d: Redis Cluster has only database 0; remove db", c.DB)
		}
	}
	if c.SentinelPassword != "" && c.Topology() != Sentinel {
		return fmt.Errorf("sentinel_password is the sentinels' password and needs `sentinel <master_name> <sentinel_addr>...`; the server's is password")
	}
	if c.DB < 0 {
		return fmt.Errorf("db must not be negative, got %d", c.DB)
	}
	if c.Timeout < 0 || time.Duration(c.Timeout) > MaxTimeout {
		return fmt.Errorf("timeout must be between 0 (default %s) and %s, got %s", DefaultTimeout, MaxTimeout, time.Duration(c.Timeout))
	}
	return nil
}

// checkAddr checks a host:port; one with a placeholder is checked once
// replaced, when the client is built.
func checkAddr(what, addr string) error {
	if strings.Contains(addr, "{") {
		return nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s: %q is not host:port (%v)", what, addr, err)
	}
	if host == "" {
		return fmt.Errorf("%s: %q lacks a host", what, addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
		return fmt.Errorf("%s: %q: port %q is not a number from 1 to 65535", what, addr, port)
	}
	return nil
}

// Identity names the connection: two configs with the same identity
// reach the same Redis the same way and may share one client. Secrets
// enter it hashed.
func (c *Config) Identity() string {
	h := sha256.Sum256([]byte(c.Password + "\x00" + c.SentinelPassword))
	return fmt.Sprintf("%s|%s|%s|%s|%s|user=%s|db=%d|tls=%v|timeout=%s|secret=%s",
		c.Topology(), c.Address, c.SentinelMaster, strings.Join(c.Sentinels, ","), strings.Join(c.Cluster, ","),
		c.Username, c.DB, c.TLS, c.timeout(), hex.EncodeToString(h[:8]))
}
