package command

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-affinity/caddy-affinity/adminapi"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// The operator commands: `caddy affinity status` and one per lifecycle
// state (drain, maintenance, up: healthcheck.States).
// They talk to a running Caddy's admin API (GET /affinity/upstreams,
// POST /affinity/upstreams/state) the way `caddy stop` and `caddy reload`
// do: the address comes from --address, else from the admin block of
// --config, else Caddy's default (localhost:2019).

// upstreamStatus is one upstream as GET /affinity/upstreams lists it
// (adminapi.UpstreamStatus, decoded loosely so that this command keeps
// working against a server with more fields).
type upstreamStatus struct {
	Upstream string  `json:"upstream"`
	State    string  `json:"state"`
	SetBy    string  `json:"set_by"`
	Healthy  bool    `json:"healthy"`
	Sessions int64   `json:"sessions"`
	Requests uint64  `json:"requests"`
	Drained  bool    `json:"drained"`
	Since    *string `json:"since"`
}

// statusCommand builds `caddy affinity status`.
func statusCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status [--address <admin>] [--config <file>] [--json]",
		Short: "Lists the upstreams of a running Caddy with their state and sessions",
		Long: `
Lists every upstream the affinity policies of a running Caddy know, as a
table:

  UPSTREAM        STATE     HEALTHY  SESSIONS  REQUESTS  DRAINED  SINCE
  127.0.0.1:9001  up        yes      12        340       -        -
  127.0.0.1:9002  draining  yes      3         120       no       2026-05-01 10:02:11 (4m12s ago)

STATE is the lifecycle state (up, draining, maintenance); HEALTHY is
Caddy's health check verdict; SESSIONS the live sessions pinned to it;
REQUESTS the requests the policy sent it since Caddy started; DRAINED
says whether a draining upstream has no session left (it can be stopped
without cutting one); SINCE when its state last changed.

The admin API address is --address, else the one in --config's admin
block, else localhost:2019. The same data, with ring shares and recent
failovers, is on the status page: http://<admin>/affinity/
`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			addr, err := adminAddress(cmd)
			if err != nil {
				return err
			}
			ups, err := listUpstreams(cmd.Context(), addr, false)
			if err != nil {
				return err
			}
			if asJSON, _ := cmd.Flags().GetBool("json"); asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(ups)
			}
			if len(ups) == 0 {
				fmt.Fprintln(cmd.OutOrStdout(), "no upstreams: no reverse_proxy with lb_policy affinity in the running config")
				return nil
			}
			if err := printTable(cmd.OutOrStdout(), ups, time.Now()); err != nil {
				return err
			}
			printWarnings(cmd.Context(), cmd.OutOrStdout(), addr)
			return nil
		},
	}
	addAdminFlags(cmd)
	cmd.Flags().Bool("json", false, "Print the admin API's JSON instead of a table")
	return cmd
}

// printWarnings prints what the status page warns of (a policy that
// cannot work as configured), if the admin API says anything.
func printWarnings(ctx context.Context, out io.Writer, addr string) {
	var st struct {
		Policies []struct {
			Handler  string   `json:"handler"`
			Warnings []string `json:"warnings"`
		} `json:"policies"`
	}
	if adminCall(ctx, addr, http.MethodGet, adminapi.StatusPath, nil, &st) != nil {
		return
	}
	for _, p := range st.Policies {
		for _, w := range p.Warnings {
			fmt.Fprintf(out, "\nWARNING (%s): %s\n", p.Handler, w)
		}
	}
}

// stateCommands build a `caddy affinity <verb> <upstream>` subcommand
// for every lifecycle state (healthcheck.States): drain, maintenance, up.
func stateCommands() []func() *cobra.Command {
	cmds := make([]func() *cobra.Command, len(healthcheck.States))
	for i, st := range healthcheck.States {
		cmds[i] = func() *cobra.Command { return stateCommand(st) }
	}
	return cmds
}

func init() { subcommands = append(subcommands, stateCommands()...) }

// stateCommand builds `caddy affinity <verb> <upstream>` for state st.
func stateCommand(st healthcheck.StateInfo) *cobra.Command {
	long := "\n" + st.Help + "\n"
	if st.Drains() {
		long += `With --wait, the command waits for it to be drained and fails if it
is not in time, so that a deploy script can go on with
'` + st.Verb + ` --wait 30m <upstream> && stop the worker'.
`
	}
	cmd := &cobra.Command{
		Use:   st.Verb + " [--address <admin>] [--config <file>] <upstream>",
		Short: st.Short,
		Long: long + `
<upstream> is the dial address as listed by 'caddy affinity status'
(127.0.0.1:9001); a unique suffix of it, such as :9001 or 9001, will do.
The state applies to every affinity proxy of that Caddy dialing the
upstream, and to the instances sharing its storage, and survives
reloads. The command prints the upstream's new status.

The admin API address is --address, else the one in --config's admin
block, else localhost:2019.
`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			addr, err := adminAddress(cmd)
			if err != nil {
				return err
			}
			wait, _ := cmd.Flags().GetDuration("wait")
			return setState(cmd.Context(), cmd.OutOrStdout(), addr, args[0], st, wait)
		},
	}
	addAdminFlags(cmd)
	if st.Drains() {
		cmd.Flags().Duration("wait", 0, "Wait up to this long (e.g. 10m) for the upstream to be drained; fail if it is not")
	}
	return cmd
}

// addAdminFlags adds the flags that find the admin API, as `caddy stop`
// has them.
func addAdminFlags(cmd *cobra.Command) {
	cmd.Flags().String("address", "", "The address of the admin API (default: from --config, else localhost:2019)")
	cmd.Flags().StringP("config", "c", "", "Configuration file whose admin address to use, if --address is not given")
	cmd.Flags().StringP("adapter", "a", "", "Name of the config adapter for --config")
}

// adminAddress determines the admin API address like `caddy stop`.
func adminAddress(cmd *cobra.Command) (string, error) {
	address, _ := cmd.Flags().GetString("address")
	config, _ := cmd.Flags().GetString("config")
	adapter, _ := cmd.Flags().GetString("adapter")
	addr, err := caddycmd.DetermineAdminAPIAddress(address, nil, config, adapter)
	if err != nil {
		return "", fmt.Errorf("finding the admin API address: %v", err)
	}
	return addr, nil
}

// listUpstreams returns GET /affinity/upstreams: the running config's
// upstreams, or with all every one still known (a state change may name
// an upstream a reload removed, and a drain may be waited for after it).
func listUpstreams(ctx context.Context, addr string, all bool) ([]upstreamStatus, error) {
	uri := adminapi.UpstreamsPath
	if all {
		uri += "?all=1"
	}
	var ups []upstreamStatus
	if err := adminCall(ctx, addr, http.MethodGet, uri, nil, &ups); err != nil {
		return nil, err
	}
	return ups, nil
}

// setState resolves the upstream, sets its state and prints the result;
// for a drain with wait > 0 it then waits until the upstream is drained.
func setState(ctx context.Context, out io.Writer, addr, arg string, st healthcheck.StateInfo, wait time.Duration) error {
	ups, err := listUpstreams(ctx, addr, true)
	if err != nil {
		return err
	}
	dial := resolveUpstream(ups, arg)
	body, _ := json.Marshal(map[string]string{"upstream": dial, "state": st.Name})
	var u upstreamStatus
	if err := adminCall(ctx, addr, http.MethodPost, adminapi.StatePath, body, &u); err != nil {
		return err
	}
	fmt.Fprintln(out, describeChange(u))
	if err := printTable(out, []upstreamStatus{u}, time.Now()); err != nil {
		return err
	}
	if !st.Drains() || wait <= 0 || u.Drained {
		return nil
	}
	// Session counts are exact when read; once a second is often enough.
	deadline := time.Now().Add(wait)
	progress := newDrainProgress(out, dial)
	defer progress.clear()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		ups, err := listUpstreams(ctx, addr, true)
		if err != nil {
			return err
		}
		v, listed := findUpstream(ups, dial)
		progress.clear()
		switch {
		case !listed:
			return fmt.Errorf("%s is no longer listed by the admin API (removed from the config?): cannot wait for it to drain", dial)
		case v.State != st.Name:
			return fmt.Errorf("%s is %s now, no longer %s: someone changed its state", dial, v.State, st.Name)
		case v.Drained:
			fmt.Fprintf(out, "%s is drained: no session left\n", dial)
			return nil
		case time.Now().After(deadline):
			return fmt.Errorf("%s still holds %d live sessions after %s", dial, v.Sessions, wait)
		default:
			progress.update(v.Sessions)
		}
	}
}

// findUpstream returns the listed upstream dialled at dial.
func findUpstream(ups []upstreamStatus, dial string) (upstreamStatus, bool) {
	for _, v := range ups {
		if v.Upstream == dial {
			return v, true
		}
	}
	return upstreamStatus{}, false
}

// resolveUpstream returns the dial address arg names: itself when listed
// (or when nothing matches, so that the API says what is wrong), else
// the only listed address ending in ":"+arg or arg.
func resolveUpstream(ups []upstreamStatus, arg string) string {
	var match []string
	for _, u := range ups {
		if u.Upstream == arg {
			return arg
		}
		if strings.HasSuffix(u.Upstream, ":"+strings.TrimPrefix(arg, ":")) || (strings.Contains(arg, ":") && strings.HasSuffix(u.Upstream, arg)) {
			match = append(match, u.Upstream)
		}
	}
	if len(match) == 1 {
		return match[0]
	}
	return arg
}

// describeChange says what the new state means, in a line.
func describeChange(u upstreamStatus) string {
	st, err := healthcheck.ParseState(u.State)
	info, _ := st.Info()
	switch {
	case err != nil:
		return fmt.Sprintf("%s is now %s", u.Upstream, u.State)
	case u.Drained:
		return fmt.Sprintf("%s is now %s, and drained: it holds no session", u.Upstream, info.Is)
	case info.Now == "":
		return fmt.Sprintf("%s is now %s", u.Upstream, info.Is)
	}
	now := strings.ReplaceAll(info.Now, "{sessions}", strconv.FormatInt(u.Sessions, 10))
	return fmt.Sprintf("%s is now %s: %s", u.Upstream, info.Is, now)
}

// printTable writes the upstreams as an aligned table.
func printTable(out io.Writer, ups []upstreamStatus, now time.Time) error {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "UPSTREAM\tSTATE\tHEALTHY\tSESSIONS\tREQUESTS\tDRAINED\tSINCE")
	for _, u := range ups {
		healthy := "yes"
		if !u.Healthy {
			healthy = "NO"
		}
		drained := "-"
		if st, err := healthcheck.ParseState(u.State); err == nil && st.Drains() {
			drained = "no"
			if u.Drained {
				drained = "yes"
			}
		}
		state := u.State
		if u.SetBy != "" {
			state += " (" + u.SetBy + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\n", u.Upstream, state, healthy, u.Sessions, u.Requests, drained, since(u.Since, now))
	}
	return tw.Flush()
}

// since formats a state change time as local time and age.
func since(s *string, now time.Time) string {
	if s == nil {
		return "-"
	}
	t, err := time.Parse(time.RFC3339, *s)
	if err != nil {
		return *s
	}
	return fmt.Sprintf("%s (%s ago)", t.Local().Format("2006-01-02 15:04:05"), now.Sub(t).Round(time.Second))
}

// adminCall sends a request to the admin API and decodes a 2xx JSON
// answer into out. It is caddycmd.AdminAPIRequest's way of reaching the
// admin API (unix sockets included, the Origin header Caddy checks), but
// it returns the API's own error message on 4xx and 5xx.
func adminCall(ctx context.Context, addr, method, uri string, body []byte, out any) error {
	parsed, err := caddy.ParseNetworkAddress(addr)
	if err != nil || parsed.PortRangeSize() > 1 {
		return fmt.Errorf("invalid admin address %s: %v", addr, err)
	}
	origin := "http://" + parsed.JoinHostPort(0)
	dial := parsed.JoinHostPort(0)
	if parsed.IsUnixNetwork() || parsed.IsFdNetwork() {
		// Any host will do over a socket; Caddy checks neither Host nor
		// Origin there.
		origin = "http://127.0.0.1"
		dial = parsed.Host
		if i := strings.LastIndexByte(dial, '|'); i >= 0 {
			dial = dial[:i] // unix socket permission bits, not part of the path
		}
	}
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, origin+uri, bytes.NewReader(body))
	if err != nil {
		return err
	}
	if !parsed.IsUnixNetwork() && !parsed.IsFdNetwork() {
		req.Header.Set("Origin", origin)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	client := http.Client{Transport: &http.Transport{
		Proxy: nil, // the admin API is local: never through an HTTP proxy
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, parsed.Network, dial)
		},
	}}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("reaching Caddy's admin API at %s: %v (is Caddy running? see --address)", addr, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return fmt.Errorf("reading the admin API's answer: %v", err)
	}
	if resp.StatusCode >= 400 {
		var apiErr struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(data, &apiErr) == nil && apiErr.Error != "" {
			return errors.New(apiErr.Error)
		}
		if resp.StatusCode == http.StatusNotFound {
			return fmt.Errorf("%s %s: 404: this Caddy has no caddy-affinity admin API (a build without the module?)", method, uri)
		}
		return fmt.Errorf("%s %s: %s: %s", method, uri, resp.Status, strings.TrimSpace(string(data)))
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("decoding the admin API's answer to %s %s: %v", method, uri, err)
	}
	return nil
}
