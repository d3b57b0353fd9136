"""The run lifecycle's rules, as pure functions (no I/O, no clock of their own: ``now`` is an argument). The
operator's supervisor and handlers observe, call these, and carry out what they return; no rule lives there.

=====================================================================  ============================================
rule                                                                   where
=====================================================================  ============================================
which attempt comes next (first start, retry, resume, restart between  :mod:`.attempts` (``decide_attempt``)
intent and create), never two trainers at once
activeDeadlineSeconds without the time suspended                       :mod:`.attempts` (``deadline_left``,
                                                                       ``suspended_seconds``)
backoff of a Job create the API server refused                         :mod:`.attempts` (``create_backoff``)
a spec edit of an active run applies from the next attempt             :mod:`.attempts` (``spec_edit_update``)
what an observed pod/Job means while following: follow its log, wait,  :mod:`.follow` (``next_step``,
a replacement pod, a deleted pod, a pod gone, the Job deleted          ``after_stream``)
what an ended attempt means: succeed, retry from the checkpoint, fail  :mod:`.outcome` (``attempt_outcome``,
                                                                       ``outcome_of``)
the status patch that records it (retries, Restarting, messages)       :mod:`.outcome` (``finish_update``)
cancel (annotation): when it applies, the ``Cancelled`` patch          :mod:`.policy` (``cancel_pending``,
                                                                       ``cancel_update``)
TTL after finish: when children are cleaned up                         :mod:`.policy` (``ttl_due``)
phases and conditions: which are True, when times move, terminal       :mod:`.conditions` (``transition``,
phases                                                                 ``set_condition``, ``is_terminal``)
trainer log lines → bounded status fields, coalesced patches, where a  :mod:`.fold` (``StatusFolder``,
restarted reader goes on                                               ``Throttle``, ``LogCursor``)
=====================================================================  ============================================

:mod:`.observed` reads Kubernetes pods and Jobs into the small values the rules take (``PodState``,
``JobState``); :mod:`.formats` writes times and clips messages.
"""
