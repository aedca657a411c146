"""llmctl batch: many prompts through one loaded model.

    prompts.jsonl -> lines (one Prompt or LineError per input line)
                  -> results (what an earlier run wrote is skipped: resumable)
                  -> local (parallel sequences in one model: engines.parallel)
                     or ray (the same, one model per Ray worker)
                  -> one result line per prompt, appended and flushed as each ends
"""
