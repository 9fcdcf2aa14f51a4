// Switches of the CPU emulation that the test harness reaches through ctypes.
#include "cudaCpuEmulation.h"

extern "C" __attribute__((visibility("default"))) void tfemuSetExecute(int run)
{
    tfemu::setExecute(run != 0);
}

extern "C" __attribute__((visibility("default"))) void tfemuSetResident(int blocks)
{
    tfemu::setResident(unsigned(blocks));
}
