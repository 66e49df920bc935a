// Package command adds the `caddy affinity` command to the caddy binary:
// the operator commands over the admin API (status, lookup, drain,
// maintenance, up) and the demo (a farm of in-memory-session workers
// behind Caddy, or one such worker). Import it for its side effects, as
// the caddy-affinity root package does.
package command

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// subcommands build the `caddy affinity` subcommands: the demo's in
// demo.go and worker.go, the operator commands in operate.go and
// lookup.go.
var subcommands = []func() *cobra.Command{
	workerCommand,
	demoCommand,
	statusCommand,
	lookupCommand,
	// and a command per lifecycle state (operate.go's stateCommands)
}

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "affinity",
		Usage: "<subcommand> [flags]",
		Short: "Session affinity for reverse_proxy: upstream states, status, demo",
		Long: `
Commands that go with the affinity load-balancing policy
(lb_policy affinity), which pins each HTTP session to one upstream so
that apps keeping sessions in process memory (ASP.NET InProc, Tomcat,
express-session's MemoryStore) keep working behind several workers.

  caddy affinity status                  the upstreams of a running Caddy
  caddy affinity lookup <key>            where a session goes now, and why
  caddy affinity drain <upstream>        keep its sessions, no new ones
  caddy affinity maintenance <upstream>  take it out now: sessions fail over
  caddy affinity up <upstream>           back in service
  caddy affinity demo                    three workers behind Caddy, with a kill switch
  caddy affinity worker                  one demo worker, to run as its own process

The operator commands talk to the admin API (--address, else the admin
address of --config, else localhost:2019), whose status page is
http://<admin address>/affinity/
`,
		CobraFunc: buildAffinityCommand,
	})
}

// buildAffinityCommand adds the subcommands to `caddy affinity`, and makes
// every mistake on its command line (an unknown subcommand, a bad flag,
// a wrong number of arguments) exit non-zero with a one-line hint.
func buildAffinityCommand(cmd *cobra.Command) {
	var names []string
	for _, build := range subcommands {
		sub := build()
		names = append(names, sub.Name())
		withUsageHint(sub)
		cmd.AddCommand(sub)
	}
	// Without a Run of its own, cobra shows the help for an unknown
	// subcommand and exits 0.
	cmd.Args = cobra.ArbitraryArgs
	cmd.RunE = func(c *cobra.Command, args []string) error {
		if len(args) == 0 {
			return c.Help()
		}
		return fmt.Errorf("unknown subcommand %q: want one of %s (see 'caddy affinity --help')", args[0], strings.Join(names, ", "))
	}
	cmd.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return fmt.Errorf("%v (see '%s --help')", err, c.CommandPath())
	})
}

// withUsageHint makes an argument error of sub name its usage.
func withUsageHint(sub *cobra.Command) {
	check := sub.Args
	if check == nil {
		return
	}
	sub.Args = func(c *cobra.Command, args []string) error {
		if err := check(c, args); err != nil {
			return fmt.Errorf("%v: usage: caddy affinity %s (see 'caddy affinity %s --help')", err, c.Use, c.Name())
		}
		return nil
	}
}
