#!/usr/bin/env bash
# Install everything (first run) and run the test suite. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" requirements-dev.txt
set +e
python -m pytest -q "$@"
status=$?
set -e
# pytest's 5 means no test ran: that is a failure for CI, never a pass.
exit $status
