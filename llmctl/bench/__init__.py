"""`llmctl bench`: the runner (`runner`), its rows (`results`), how rows are written
(`formats`) and the history of earlier runs (`history`)."""
