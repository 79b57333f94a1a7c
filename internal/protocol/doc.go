// Package protocol is the control protocol between dbdctl and the server
// of one attached minor: where a minor's socket and log are, the typed
// requests and responses, errors that keep their identity across the
// socket, the server side's framing and credential check (Server), and a
// typed client (Client). It knows nothing of ublk or COW files; the daemon
// implements Handler and the CLI uses Client.
//
// On the wire each connection carries one JSON request line and one JSON
// response line. Only root may talk to a server (SO_PEERCRED).
package protocol

import "os"

// Version is the project's version, reported by info.
const Version = "0.1.0"

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
