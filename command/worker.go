package command

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-affinity/caddy-affinity/demoapp"
)

// workerCommand builds `caddy affinity worker`.
func workerCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "worker [--listen <addr>] [--name <name>] [--cookie <name>]",
		Short: "Runs one demo app worker, sessions in memory (until SIGINT/SIGTERM)",
		Long: `
Runs one worker of the demo app in the foreground. The app keeps its
sessions in process memory, like ASP.NET InProc: every visit increments
a counter in the session, and a visit that reaches another worker, or
this one after a restart, starts again at 1.

  GET /          {"worker":"A","visits":3,"session":"1f2e3d4c"}
                 (a small HTML page when the client accepts text/html)
  GET /healthz   200 "ok", for health_uri

Once listening it prints one line, "worker <name> listening on
http://<addr>", so that a script which started it on port 0 can learn
the port. Kill it with -9 to see what a crash does to its sessions.
`,
		RunE: caddycmd.WrapCommandFuncForCobra(cmdWorker),
	}
	cmd.Flags().StringP("listen", "l", "127.0.0.1:9001", "Address to listen on (port 0 picks a free port)")
	cmd.Flags().StringP("name", "n", "", "Worker name shown in responses (default: the listen address)")
	cmd.Flags().StringP("cookie", "c", demoapp.DefaultCookieName, "Session cookie name, e.g. JSESSIONID, ASP.NET_SessionId, connect.sid")
	return cmd
}

func cmdWorker(fs caddycmd.Flags) (int, error) {
	listen := fs.String("listen")
	name := fs.String("name")
	if name == "" {
		name = listen
	}
	cookie := fs.String("cookie")
	if err := checkCookieName(cookie); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}

	// Caught before Start so that a signal right after the "listening"
	// line still shuts the worker down in order.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	w := demoapp.NewWorker(name, cookie)
	if err := w.Start(listen); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	fmt.Printf("worker %s listening on http://%s (session cookie %s)\n", w.Name(), w.Addr(), cookie)

	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := w.Shutdown(sctx); err != nil {
		return caddy.ExitCodeFailedQuit, err
	}
	return caddy.ExitCodeSuccess, nil
}
