module github.com/dbdublk/dbdublk

go 1.26.8

require (
	github.com/alecthomas/kong v1.17.0
	github.com/cavaliergopher/cpio v1.0.1
	golang.org/x/sys v0.50.0
)
