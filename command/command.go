// Package command adds the `caddy affinity` command to the caddy binary:
// subcommands to run the demo app and a ready-made demo of the affinity
// load-balancing policy. Import it for its side effects, as the
// caddy-affinity root package does.
package command

import (
	"github.com/spf13/cobra"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// subcommands build the `caddy affinity` subcommands: the demo's in
// demo.go and worker.go, the operator commands in operate.go.
var subcommands = []func() *cobra.Command{
	workerCommand,
	demoCommand,
	statusCommand,
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
  caddy affinity drain <upstream>        keep its sessions, no new ones
  caddy affinity maintenance <upstream>  take it out now: sessions fail over
  caddy affinity up <upstream>           back in service
  caddy affinity demo                    three workers behind Caddy, with a kill switch
  caddy affinity worker                  one demo worker, to run as its own process

The operator commands talk to the admin API (--address, else the admin
address of --config, else localhost:2019), whose status page is
http://<admin address>/affinity/
`,
		CobraFunc: func(cmd *cobra.Command) {
			for _, sub := range subcommands {
				cmd.AddCommand(sub())
			}
		},
	})
}
