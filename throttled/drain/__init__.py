"""The drain path, in the order an action travels it:

- supervisor.py: one coroutine per queue with work, spawned when the queue gains work;
- handover.py: portals this instance gains or loses (its leases), and work for the others;
- queue_loop.py: a queue's coroutine (sleep until its next slot, claim; the answer goes to the
  sender without waking it; it wakes once the rows have gone, and repeats);
- claimer.py: claims of queues that fall due together, in one statement;
- releases.py: rows an operator released (fail-pending), completed as FAIL_CONTINUE;
- dispatcher.py: the portal senders, the result writer and the claimed-row expiry;
- portal_sender.py: a portal's completion requests, within its budget (budget.py), each
  charged to its queues' limiters at the instant it is written (charges.py);
- judge.py: what HubSpot's answer to a request means for its rows (done, retried, failed);
- outcomes.py: what became of a request's rows;
- result_writer.py: outcomes written in few statements.
"""
