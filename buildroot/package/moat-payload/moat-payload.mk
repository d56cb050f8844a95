################################################################################
#
# moat-payload: the frozen moat program, built beforehand by `make payload`
#
################################################################################

MOAT_PAYLOAD_VERSION = local
MOAT_PAYLOAD_SITE = $(call qstrip,$(BR2_PACKAGE_MOAT_PAYLOAD_DIR))
MOAT_PAYLOAD_SITE_METHOD = local
MOAT_PAYLOAD_LICENSE = Proprietary

define MOAT_PAYLOAD_INSTALL_TARGET_CMDS
	rm -rf $(TARGET_DIR)/usr/lib/moat
	mkdir -p $(TARGET_DIR)/usr/lib/moat $(TARGET_DIR)/usr/bin
	cp -a $(@D)/. $(TARGET_DIR)/usr/lib/moat/
	ln -sf ../lib/moat/moat $(TARGET_DIR)/usr/bin/moat
	for verb in $$($(TARGET_DIR)/usr/lib/moat/moat --help | \
			sed -n 's/^  \([a-z][a-z0-9-]*\)  .*/\1/p'); do \
		ln -sf moat $(TARGET_DIR)/usr/bin/moat-$$verb; \
	done
endef

$(eval $(generic-package))
