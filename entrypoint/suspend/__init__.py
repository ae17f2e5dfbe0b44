"""The suspend/resume core: observe, plan (pure), refuse (safety), quiesce, execute, prove (pure), record; the
library API (`move_to`), the status, the light sleep and the hold that the commands and the gate share."""
