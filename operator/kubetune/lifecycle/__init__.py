"""The run lifecycle's rules, as pure functions (no I/O, no clock of their own: ``now`` is an argument). The
operator's supervisor and handlers observe, call these, and carry out what they return; no rule lives there.

=====================================================================  ============================================
rule                                                                   where
=====================================================================  ============================================
which attempt comes next (first start, retry, resume, restart between  :mod:`.attempts` (``decide_attempt``)
intent and create), never two trainers at once
a deleted Job or a spent deadline ends the run before an attempt       :mod:`.attempts` (``ending``)
the intent for attempt N, recorded before its Job (Pending, why)       :mod:`.attempts` (``intent_update``)
the Job exists: Created, end of Restarting and JobCreateFailed         :mod:`.attempts` (``created_update``)
waiting for an earlier attempt's pods to stop: the run's message       :mod:`.attempts` (``wait_previous_update``)
a Job create the API server refused: the condition, the Warning, the   :mod:`.attempts` (``create_refused_update``,
backoff                                                                ``create_backoff``)
how long a retry waits before its attempt                              :mod:`.attempts` (``retry_delay``)
activeDeadlineSeconds without the time suspended; resuming keeps that  :mod:`.attempts` (``deadline_left``,
time                                                                   ``suspended_seconds``, ``resumed_update``)
which spec a decision uses (live, last valid, the running Job's), an  :mod:`.attempts` (``spec_to_run``,
invalid one fails the run                                              ``invalid_spec``)
a spec edit of an active run applies from the next attempt             :mod:`.attempts` (``spec_edit_update``)
what an observed pod/Job means while following: follow its log, wait,  :mod:`.follow` (``next_step``,
a replacement pod, a deleted pod, a pod gone, the Job deleted          ``after_stream``, ``job_deleted``)
what following reports: Running once the log stream opens or the       :mod:`.follow` (``stream_opened``,
trainer starts; a replaced pod, a pod waiting on a problem (image      ``trainer_started``, ``pod_replaced``,
pull, config: a Warning once per problem); a trainer's ``failed``      ``waiting_problem``, ``trainer_failed``)
event in the run's message
what an ended attempt means: succeed, retry from the checkpoint, fail  :mod:`.outcome` (``attempt_outcome``,
                                                                       ``outcome_of``)
the status patch that records it (retries, Restarting, messages)       :mod:`.outcome` (``finish_update``)
a new run: accepted once; an invalid spec fails it, a suspended one    :mod:`.policy` (``accepting``,
waits                                                                  ``accept_update``)
the platform's admission: its allow-list (images, priority classes,    :mod:`.policy` (``admission``,
toleration keys, GPUs), the run config's size; a refused run or edit   ``policy_violations``, ``Refusal``,
                                                                       ``refused_edit_update``, ``readmitted``)
when the supervisor runs (not ended, not suspended, no cancel)         :mod:`.policy` (``is_active``,
                                                                       ``is_suspended``)
suspend and resume: when a flip applies, their patches                 :mod:`.policy` (``suspend_toggle``,
                                                                       ``suspend_update``, ``resume_update``)
cancel (annotation): when it applies, the ``Cancelled`` patch          :mod:`.policy` (``cancel_pending``,
                                                                       ``cancel_update``)
TTL after finish: when the timer runs, when children are cleaned up,   :mod:`.policy` (``ttl_pending``,
the ``CleanedUp`` patch                                                ``ttl_due``, ``ttl_update``)
phases and conditions: which are True, when times move, terminal       :mod:`.conditions` (``transition``,
phases                                                                 ``set_condition``, ``is_terminal``,
                                                                       ``PhaseChange``, ``Notice``)
trainer log lines → bounded status fields, coalesced patches, where a  :mod:`.fold` (``StatusFolder``,
restarted reader goes on                                               ``Throttle``, ``LogCursor``)
=====================================================================  ============================================

:mod:`.observed` reads Kubernetes pods and Jobs into the small values the rules take (``PodState``,
``JobState``); :mod:`.formats` writes times and clips messages.
"""
