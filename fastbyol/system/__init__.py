"""The process and the machine: torchrun set-up and collectives (`distributed`), the environment variables
(`environment`), the machine's limits before anything is allocated (`bounds`) and the native libraries' output
(`native`)."""
