package redisconn

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
)

// ClusterStateReload is how stale a Cluster client's slot map may get
// while its calls succeed (go-redis's default is 60s). A call that fails
// with a network error, CLUSTERDOWN or TRYAGAIN reloads it at once (see
// bound); this interval covers the clients that make few calls, such as
// a subscriber whose node died: its reconnection asks the slot map for
// the channel's node.
const ClusterStateReload = 2 * time.Second

// Client builds the client for the config (Validate it first): a plain
// client, a Sentinel failover client or a Cluster client, as a
// redis.UniversalClient. It connects lazily: nothing here waits for
// Redis. Placeholders in the options are replaced here.
//
// Every call (a command, a pipeline) is bounded by the timeout in total,
// whatever deadline its context has or lacks: the dial, the wait for a
// pooled connection, the write, the read, and a Cluster client's
// redirects and retries all fit in it (one dial attempt, no retry of a
// failed command past the deadline). Publish/subscribe is the exception:
// a PubSub waits for messages as long as its context lets it, and go-redis
// reconnects it when its connection fails (to the new master after a
// Sentinel or Cluster failover).
//
// After a failover the client finds the new master by itself: the
// Sentinel client asks the sentinels (and listens to their +switch-master),
// the Cluster client follows MOVED and reloads its slot map after any
// failed call. Calls made during the failover fail within the timeout.
func (c *Config) Client() redis.UniversalClient {
	repl := caddy.NewReplacer()
	r := func(s string) string { return repl.ReplaceKnown(s, "") }
	rs := func(in []string) []string {
		out := make([]string, len(in))
		for i, s := range in {
			out[i] = r(s)
		}
		return out
	}
	timeout := c.timeout()
	var tlsConfig *tls.Config
	if c.TLS {
		// No ServerName: go-redis dials with tls.DialWithDialer, which
		// verifies each connection against its own host (a sentinel, the
		// master it names, each Cluster node as it announces itself).
		tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	b := &bound{timeout: timeout}
	u := &redis.UniversalOptions{
		Username:         r(c.Username),
		Password:         r(c.Password),
		SentinelPassword: r(c.SentinelPassword),
		DB:               c.DB,
		TLSConfig:        tlsConfig,
		DialTimeout:      timeout,
		ReadTimeout:      timeout,
		WriteTimeout:     timeout,
		PoolTimeout:      timeout,
		// The deadline of the call's context (set by bound) applies to
		// reads and writes too, so that retries fit in it.
		ContextTimeoutEnabled: true,
		// A failed command is not retried by a node's client: the caller
		// goes on without Redis, and the next call finds the new master.
		// A Cluster client's own retries (MOVED, ASK, CLUSTERDOWN,
		// TRYAGAIN, a dead node: another try after a short backoff) stay,
		// within the call's deadline.
		MaxRetries:   -1,
		MaxRedirects: 3,
		// One dial attempt: the default of five, 100ms apart, spends the
		// whole timeout on a dead master.
		DialerRetries: 1,
		// No CLIENT SETINFO on every new connection.
		DisableIdentity: true,
		// Connections dialled ahead, in the background, so that a burst
		// of requests seldom waits for a dial.
		MinIdleConns: 8,
	}
	var client redis.UniversalClient
	switch c.Topology() {
	case Sentinel:
		u.MasterName, u.Addrs = r(c.SentinelMaster), rs(c.Sentinels)
		client = redis.NewFailoverClient(u.Failover())
	case Cluster:
		u.Addrs = rs(c.Cluster)
		opts := u.Cluster()
		opts.MinIdleConns = 2 // per node
		opts.ClusterStateReloadInterval = ClusterStateReload
		cc := redis.NewClusterClient(opts)
		b.reload = func() { cc.ReloadState(context.Background()) }
		client = cc
	default:
		u.Addrs = []string{r(c.Address)}
		client = redis.NewClient(u.Simple())
	}
	client.AddHook(b)
	return client
}

// bound is the hook that gives every call the timeout as its deadline
// (unless its context has an earlier one), and makes a Cluster client
// reload its slot map after a call failed for a reason a failover
// explains.
type bound struct {
	timeout time.Duration
	reload  func() // nil unless Cluster
}

func (b *bound) DialHook(next redis.DialHook) redis.DialHook { return next }

func (b *bound) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		ctx, cancel := b.deadline(ctx)
		err := next(ctx, cmd)
		cancel()
		b.after(err)
		return err
	}
}

func (b *bound) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		ctx, cancel := b.deadline(ctx)
		err := next(ctx, cmds)
		cancel()
		if err == nil {
			for _, cmd := range cmds {
				if cmd.Err() != nil {
					err = cmd.Err()
					break
				}
			}
		}
		b.after(err)
		return err
	}
}

func noCancel() {}

// deadline returns ctx bounded by the timeout; without allocating when
// the caller's deadline is earlier already.
func (b *bound) deadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if d, ok := ctx.Deadline(); ok && time.Until(d) <= b.timeout {
		return ctx, noCancel
	}
	return context.WithTimeout(ctx, b.timeout)
}

// after reloads a Cluster client's slot map after an error that says
// the cluster may have changed. go-redis reloads it itself only on
// MOVED, ASK or READONLY, or when it is older than its reload interval:
// a dead master's slots would keep going to the dead address.
func (b *bound) after(err error) {
	if b.reload == nil || err == nil || errors.Is(err, redis.Nil) || !FailoverError(err) {
		return
	}
	b.reload()
}

// FailoverError reports whether err is what a call meets while a node
// dies or a replica takes over: a network error or timeout, CLUSTERDOWN,
// TRYAGAIN, MASTERDOWN, READONLY (a demoted master) or LOADING. A caller
// treats it as Redis being unavailable for a moment, never as a bad
// request.
func FailoverError(err error) bool {
	if err == nil {
		return false
	}
	var ne net.Error
	if errors.As(err, &ne) || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	return redis.IsClusterDownError(err) || redis.IsTryAgainError(err) || redis.IsMasterDownError(err) ||
		redis.IsReadOnlyError(err) || redis.IsLoadingError(err) || isEOF(err)
}

func isEOF(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed)
}

var _ redis.Hook = (*bound)(nil)
