"""The process and the machine: torchrun set-up and collectives (`distributed`), bounded waits on the other ranks
(`peers`) and their agreement before the first step (`agreement`), the child processes (`children`), the stop
signals (`signals`), the environment variables (`environment`), the machine's limits before anything is allocated
(`bounds`) and the native libraries' output (`native`)."""
