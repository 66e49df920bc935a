// Package command adds the `caddy affinity` command to the caddy binary:
// subcommands to run the demo app and a ready-made demo of the affinity
// load-balancing policy. Import it for its side effects, as the
// caddy-affinity root package does.
package command

import (
	"github.com/spf13/cobra"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// subcommands build the `caddy affinity` subcommands. Each has its own
// file; the operator commands (status, drain, maintenance, up) belong
// here too when they are written.
var subcommands = []func() *cobra.Command{
	workerCommand,
	demoCommand,
}

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "affinity",
		Usage: "<subcommand> [flags]",
		Short: "Session affinity for reverse_proxy: demo app and tools",
		Long: `
Commands that go with the affinity load-balancing policy
(lb_policy affinity), which pins each HTTP session to one upstream so
that apps keeping sessions in process memory (ASP.NET InProc, Tomcat,
express-session's MemoryStore) keep working behind several workers.

  caddy affinity demo     three workers behind Caddy, with a kill switch
  caddy affinity worker   one demo worker, to run as its own process
`,
		CobraFunc: func(cmd *cobra.Command) {
			for _, sub := range subcommands {
				cmd.AddCommand(sub())
			}
		},
	})
}
