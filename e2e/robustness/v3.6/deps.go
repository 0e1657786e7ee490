//go:build tools

// The robustness suite ../run.sh builds with `go test -c go.etcd.io/etcd/tests/v3/robustness`
// (its only package file is a test); naming the packages it uses keeps their dependencies
// in go.mod and go.sum.
package deps

import (
	_ "github.com/stretchr/testify/require"
	_ "go.etcd.io/etcd/tests/v3/framework"
	_ "go.etcd.io/etcd/tests/v3/framework/e2e"
	_ "go.etcd.io/etcd/tests/v3/robustness/client"
	_ "go.etcd.io/etcd/tests/v3/robustness/failpoint"
	_ "go.etcd.io/etcd/tests/v3/robustness/identity"
	_ "go.etcd.io/etcd/tests/v3/robustness/model"
	_ "go.etcd.io/etcd/tests/v3/robustness/report"
	_ "go.etcd.io/etcd/tests/v3/robustness/scenarios"
	_ "go.etcd.io/etcd/tests/v3/robustness/traffic"
	_ "go.etcd.io/etcd/tests/v3/robustness/validate"
	_ "go.uber.org/zap/zaptest"
	_ "golang.org/x/sync/errgroup"
)
