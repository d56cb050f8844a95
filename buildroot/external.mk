include $(sort $(wildcard $(BR2_EXTERNAL_MOAT_PATH)/package/*/*.mk))
