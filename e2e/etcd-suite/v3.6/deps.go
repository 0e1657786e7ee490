//go:build tools

// The test packages ../run.sh builds with `go test -c`; naming them here keeps their
// dependencies (and their tests') in go.mod and go.sum.
package deps

import (
	_ "go.etcd.io/etcd/tests/v3/common"
	_ "go.etcd.io/etcd/tests/v3/e2e"
)
