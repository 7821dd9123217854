"""The drain path, in the order an action travels it:

- supervisor.py: one coroutine per queue with work, spawned when the queue gains work;
- handover.py: portals this instance gains or loses (its leases), and work for the others;
- queue_loop.py: a queue's coroutine (sleep until its next slot, claim, hand over, repeat);
- claimer.py: claims of queues that fall due together, in one statement;
- releases.py: rows an operator released (fail-pending), completed as FAIL_CONTINUE;
- dispatcher.py: the portal senders, the result writer and the claimed-row expiry;
- portal_sender.py: a portal's completion requests, within its budget (budget.py);
- outcomes.py: what became of a request's rows;
- result_writer.py: outcomes written in few statements.
"""
