"""The checkpoint backends: their small interface, NVIDIA's cuda-checkpoint binary, the driver API, the owned
driver calls that outlive a killed caller, and the GPU memory readings (NVML)."""
