package redisconn

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// UnmarshalOption parses one connection option inside the block of
// `store redis`, with the dispenser on the option's name, and reports
// whether it was a connection option (false: not one of these, nothing
// consumed; the store parses it or rejects it). Errors name the line.
// The store's parser calls it for every option it does not own, and
// Validate once the block is read.
//
//	store redis [<host:port>] {
//		sentinel <master_name> <sentinel_addr>...
//		sentinel_password <password>
//		cluster <node_addr>...
//		username <name>
//		password <password>
//		db <n>
//		tls
//		timeout <duration>
//	}
func (c *Config) UnmarshalOption(d *caddyfile.Dispenser) (bool, error) {
	opt := d.Val()
	switch opt {
	case "sentinel":
		if c.SentinelMaster != "" {
			return true, d.Err("store redis: sentinel specified more than once; list every sentinel on one line")
		}
		if !d.NextArg() {
			return true, d.Err("store redis: sentinel: need the master's name and the sentinels (sentinel mymaster 10.0.0.1:26379 10.0.0.2:26379)")
		}
		c.SentinelMaster = d.Val()
		for d.NextArg() {
			c.Sentinels = append(c.Sentinels, d.Val())
		}
		if len(c.Sentinels) == 0 {
			return true, d.Errf("store redis: sentinel %s: need at least one sentinel's host:port after the master's name", c.SentinelMaster)
		}
		return true, c.checkLine(d, "sentinel", c.Sentinels)
	case "cluster":
		if len(c.Cluster) > 0 {
			return true, d.Err("store redis: cluster specified more than once; list every node on one line")
		}
		for d.NextArg() {
			c.Cluster = append(c.Cluster, d.Val())
		}
		if len(c.Cluster) == 0 {
			return true, d.Err("store redis: cluster: need at least one node's host:port (cluster 10.0.0.1:6379 10.0.0.2:6379)")
		}
		return true, c.checkLine(d, "cluster", c.Cluster)
	case "tls":
		if d.NextArg() {
			return true, d.Errf("store redis: tls takes no value, got %q", d.Val())
		}
		c.TLS = true
		return true, nil
	case "sentinel_password", "username", "password", "db", "timeout":
	default:
		return false, nil
	}
	if !d.NextArg() {
		return true, d.Errf("store redis: %s: need a value", opt)
	}
	v := d.Val()
	if d.NextArg() {
		return true, d.Errf("store redis: %s takes one value, got another: %q", opt, d.Val())
	}
	switch opt {
	case "sentinel_password":
		c.SentinelPassword = v
	case "username":
		c.Username = v
	case "password":
		c.Password = v
	case "db":
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return true, d.Errf("store redis: db: %q is not a whole number >= 0", v)
		}
		c.DB = n
	case "timeout":
		dur, err := caddy.ParseDuration(v)
		if err != nil || dur <= 0 {
			return true, d.Errf("store redis: timeout: %q is not a positive duration", v)
		}
		if dur > MaxTimeout {
			return true, d.Errf("store redis: timeout %q is too long, the most is %s", v, MaxTimeout)
		}
		c.Timeout = caddy.Duration(dur)
	}
	return true, nil
}

// checkLine checks the addresses of a sentinel or cluster line, so that
// a typo is reported with its line rather than at Validate.
func (c *Config) checkLine(d *caddyfile.Dispenser, what string, addrs []string) error {
	for _, a := range addrs {
		if err := checkAddr(what, a); err != nil {
			return d.Errf("store redis: %v", err)
		}
	}
	return nil
}
