"""The run lifecycle's rules, as pure functions (no I/O, no clock of their own): the operator's supervisor and
handlers observe, call these, and carry out what they return."""
