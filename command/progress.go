package command

import (
	"fmt"
	"io"
	"os"
	"time"
)

// drainProgress shows how a `drain --wait` is going on one line of a
// terminal (sessions left, time waited), rewritten in place on every
// poll. Piped or redirected, it writes nothing: a script gets the
// command's lines and no carriage returns.
type drainProgress struct {
	out   io.Writer
	tty   bool
	dial  string
	start time.Time
	shown bool
}

func newDrainProgress(out io.Writer, dial string) *drainProgress {
	return &drainProgress{out: out, tty: isTerminal(out), dial: dial, start: time.Now()}
}

// isTerminal reports whether out is a terminal (a character device).
func isTerminal(out io.Writer) bool {
	f, ok := out.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// update shows the sessions left and the time waited so far.
func (p *drainProgress) update(sessions int64) {
	if !p.tty {
		return
	}
	p.shown = true
	fmt.Fprintf(p.out, "\r\033[Kwaiting for %s to drain: %d live sessions left, waited %s", p.dial, sessions, time.Since(p.start).Round(time.Second))
}

// clear erases the progress line, before other output.
func (p *drainProgress) clear() {
	if p.shown {
		fmt.Fprint(p.out, "\r\033[K")
		p.shown = false
	}
}
